"""Judge a representation by k-nearest-neighbour classification of its features.

The protocol of Wu et al. 2018 as used by DINO (Caron et al. 2021): features are
L2-normalised, each test sample's ``k`` most cosine-similar training samples vote for their
labels with weight ``exp(similarity / τ)`` (``τ = 0.07``), and the class with the largest vote
is the prediction. ``weighted=False`` gives a plain majority vote. No training is involved, so
the accuracy measures how well the features alone separate the classes — the usual yardstick
of self-supervised (e.g. DINO-style) training, compared with the same network at random
initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill.taps import FeatureTaps

IGNORE = -1


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def features_of(model: nn.Module, inputs: Tensor, feature_layer: str | None = None) -> Tensor:
    """``(B, D)`` features: the model's output, or the output of layer ``feature_layer``, flattened."""
    if feature_layer is None:
        return model(inputs).flatten(1)
    with FeatureTaps(model, [feature_layer]) as taps:
        model(inputs)
        out = taps.pop()[feature_layer]
    return out.flatten(1)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    inputs: Tensor,
    feature_layer: str | None = None,
    batch_size: int = 512,
) -> Tensor:
    """Features ``(N, D)`` (float32, CPU) of ``inputs`` ``(N, ...)`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        chunks = [
            features_of(model, inputs[i : i + batch_size].to(device), feature_layer).float().cpu()
            for i in range(0, inputs.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """Class votes ``(M, C)`` of the ``k`` cosine-nearest training samples of each query.

    Training rows labelled ``-1`` (unlabelled) are left out of the bank. Each neighbour adds
    ``exp(cos / temperature)`` (``weighted``) or 1 to its class.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels"
        )
    keep = train_labels != IGNORE
    bank = F.normalize(train_features[keep].float(), dim=1)  # (N, D)
    labels = train_labels[keep].long().to(bank.device)  # (N,)
    if bank.shape[0] == 0:
        raise ValueError("no labelled training sample to vote")
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_features.shape[0], batch_size):
        query = F.normalize(
            query_features[start : start + batch_size].float().to(bank.device), dim=1
        )
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (m, k)
        votes = (sim / temperature).exp() if weighted else torch.ones_like(sim)
        scores = torch.zeros(query.shape[0], classes, device=bank.device)
        out.append(scores.scatter_add_(1, labels[idx], votes))
    return torch.cat(out)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
) -> float:
    """Top-1 accuracy of the k-NN vote (cosine similarity, see :func:`knn_scores`)."""
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(
        train_features, train_labels, test_features, k, temperature, weighted, classes
    )
    return (scores.argmax(1).cpu() == test_labels.cpu()).float().mean().item()


def knn_evaluate(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    feature_layer: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 512,
) -> float:
    """k-NN accuracy of ``model``'s features: bank from ``train = (x, y)``, queries ``test``."""
    train_f = extract_features(model, train[0], feature_layer, batch_size)
    test_f = extract_features(model, test[0], feature_layer, batch_size)
    return knn_accuracy(train_f, train[1], test_f, test[1], k, temperature)


class KNNClassifier(nn.Module):
    """A k-NN classifier over a backbone's features, for the Trainer's per-epoch evaluation.

    ``forward`` returns ``log`` of the normalised k-NN votes ``(B, C)`` — its argmax is the
    k-NN prediction, so ``kdistill.trainer.evaluate`` reports k-NN accuracy. The bank (the
    features of ``reference``) is recomputed lazily after every change of mode, i.e. once per
    evaluation. The backbone is *not* a submodule; ``state_dict()`` and ``load_state_dict()``
    are the backbone's, so saving "the student" saves the backbone alone.
    """

    backbone: nn.Module

    def __init__(
        self,
        backbone: nn.Module,
        reference: tuple[Tensor, Tensor],
        feature_layer: str | None = None,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 512,
    ) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone  # not registered: no duplicate weights
        self.reference = (reference[0].cpu(), reference[1].cpu())
        self.feature_layer = feature_layer
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size
        self.num_classes = int(self.reference[1].max()) + 1
        self._bank: Tensor | None = None
        self.training = backbone.training

    def train(self, mode: bool = True) -> KNNClassifier:
        self.training = mode
        self.backbone.train(mode)
        self._bank = None
        return self

    def forward(self, inputs: Tensor) -> Tensor:
        if self._bank is None:
            self._bank = extract_features(
                self.backbone, self.reference[0], self.feature_layer, self.batch_size
            )
            self.backbone.train(self.training)  # extract_features restores; keep in sync
        with torch.no_grad():
            query = features_of(self.backbone, inputs, self.feature_layer)
            scores = knn_scores(
                self._bank.to(query.device),
                self.reference[1],
                query,
                self.k,
                self.temperature,
                num_classes=self.num_classes,
            )
        return torch.log(scores / scores.sum(1, keepdim=True).clamp(min=1e-12) + 1e-12)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.backbone.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:  # type: ignore[override]
        return self.backbone.load_state_dict(state_dict, strict=strict, assign=assign)
