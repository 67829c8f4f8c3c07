"""Adapters built from shapes map the student tensor exactly onto the teacher's shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.adapters import Resize2d, make_adapter
from kdistill.distiller import AUTO, Distiller, LossTerm
from kdistill.losses import AttentionTransferLoss, HintLoss, LabelSmoothingCrossEntropy


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ((2, 16, 7, 7), (2, 64, 7, 7)),  # channels only: 1x1 conv
        ((2, 16, 7, 7), (2, 64, 14, 14)),  # smaller map: upsample then conv
        ((2, 16, 28, 28), (2, 64, 14, 14)),  # larger map: pool then conv
        ((2, 5, 32), (2, 5, 48)),  # sequences: linear on the last dim
        ((2, 32), (2, 48)),  # vectors
        ((2, 64, 1, 1), (2, 256)),  # pooled map against a vector: flatten + linear
    ],
)
def test_adapter_output_has_the_teacher_shape(student: tuple, teacher: tuple) -> None:
    adapter = make_adapter(student, teacher)
    assert adapter(torch.randn(student)).shape == teacher


def test_equal_shapes_need_no_adapter() -> None:
    assert isinstance(make_adapter((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)


def test_incompatible_ranks_raise_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="same rank"):
        make_adapter((2, 32), (2, 8, 4, 4))


def test_resize_pools_down_and_interpolates_up() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(Resize2d((2, 2))(x), nn.functional.adaptive_avg_pool2d(x, 2))
    assert Resize2d((8, 8))(x).shape == (1, 1, 8, 8)


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_auto_adapter_is_built_for_shape_sensitive_losses_only() -> None:
    student, teacher = Net(4), Net(8)
    terms = [
        LossTerm("hint", HintLoss(), student="conv", teacher="conv", adapter=AUTO),
        LossTerm("at", AttentionTransferLoss(), student="conv", teacher="conv", adapter=AUTO),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), teacher=None),
    ]
    distiller = Distiller(student, terms, teacher)
    x = torch.randn(2, 1, 6, 6)
    assert distiller.build_adapters(x) == ["hint"]
    assert isinstance(distiller.terms[0].adapter, nn.Sequential)
    assert distiller.terms[1].adapter is None  # AT compares attention maps of any width
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trainable for p in distiller.terms[0].adapter.parameters())
    out = distiller(x, torch.tensor([0, 2]))
    out["loss"].backward()
    assert distiller.terms[0].adapter[0].weight.grad is not None


def test_probing_shapes_leaves_batchnorm_statistics_and_mode_alone() -> None:
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    student(torch.randn(2, 1, 5, 5))  # materialise the lazy layer
    before = student[1].running_mean.clone()
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 3))
    terms = [LossTerm("hint", HintLoss(), student="0", teacher="0", adapter=AUTO)]
    distiller = Distiller(student, terms, teacher).train()
    distiller.build_adapters(torch.randn(2, 1, 5, 5))
    assert torch.equal(student[1].running_mean, before)
    assert student.training
