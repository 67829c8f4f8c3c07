"""Models not written for KD: layers named by path as torchvision / timm / Hugging Face name them.

Nothing here is rewritten to return features; the distiller reads them through hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from kdistill.distiller import AUTO, Distiller, LossTerm
from kdistill.losses import (
    AttentionTransferLoss,
    CosineLoss,
    HintLoss,
    KDLoss,
    LabelSmoothingCrossEntropy,
    RKDLoss,
)
from kdistill.models.cifar import resnet8x4, resnet20


class HFStyleLayer(nn.Module):
    """Like a transformers encoder layer: returns a tuple ``(hidden_states, attentions)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.output = nn.Sequential(nn.Linear(width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention(x, x, x)
        return (self.output(x + attended), weights)


class HFStyleEncoder(nn.Module):
    """``embeddings`` → ``encoder.layer.N`` → pooled classifier, as BERT-like models are named."""

    def __init__(self, width: int, depth: int, vocab: int = 50, classes: int = 3) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, width)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(HFStyleLayer(width) for _ in range(depth))
        self.classifier = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)  # (B, T, D)
        for layer in self.encoder.layer:
            hidden = layer(hidden)[0]
        return self.classifier(hidden.mean(1))  # (B, classes)


def test_torchvision_style_resnet_layers_distil_by_dotted_path() -> None:
    teacher, student = resnet20(num_classes=10), resnet8x4(num_classes=10)
    terms = [
        LossTerm("kd", KDLoss(4.0), 0.9),
        LossTerm(
            "hint",
            HintLoss(),
            1.0,
            student="layer3.0.conv2",
            teacher="layer3.2.conv2",
            adapter=AUTO,
        ),  # (B, 256, 8, 8) -> (B, 64, 8, 8)
        LossTerm("at", AttentionTransferLoss(), 100.0, student="layer2", teacher="layer2"),
        LossTerm("rkd", RKDLoss(), 1.0, student="avgpool", teacher="avgpool"),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 0.1, teacher=None),
    ]
    distiller = Distiller(student, terms, teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert distiller.build_adapters(x) == ["hint"]
    out = distiller(x, y)
    out["loss"].backward()
    assert {"kd_loss", "hint_loss", "at_loss", "rkd_loss", "ce_loss"} <= set(out)
    assert student.layer3[0].conv2.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_hugging_face_style_encoder_tuple_outputs_are_unwrapped() -> None:
    teacher, student = HFStyleEncoder(16, depth=4), HFStyleEncoder(8, depth=2)
    terms = [
        LossTerm("kd", KDLoss(2.0), 0.5),
        LossTerm(
            "hidden",
            CosineLoss(),
            1.0,
            student="encoder.layer.1",
            teacher="encoder.layer.3",
            adapter=AUTO,
        ),  # tuple outputs: the hidden states (B, T, 8) -> (B, T, 16)
    ]
    distiller = Distiller(student, terms, teacher)
    ids = torch.randint(0, 50, (3, 5))
    assert distiller.build_adapters(ids) == ["hidden"]
    out = distiller(ids)
    out["loss"].backward()
    assert student.encoder.layer[1].output[0].weight.grad is not None
    assert isinstance(distiller.terms[1].adapter, nn.Linear)
