from __future__ import annotations

import math

import pytest
import torch
from scheme_helpers import CLASSES, DIM, blobs, mlp
from torch import nn

from kdistill.distiller import Distiller, LossTerm
from kdistill.experiment import cache_teacher_outputs
from kdistill.losses import HintLoss, KDLoss, kd_loss
from kdistill.schemes import MultiTeacher, confidence_scores, normalise_weights


class Fixed(nn.Module):
    """A 'teacher' returning given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]] * self.scale


def test_weights_are_normalised_and_validated() -> None:
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    assert MultiTeacher([mlp(4), mlp(8), mlp(16)], weights=[2, 2, 4]).weights == [0.25, 0.25, 0.5]
    assert math.isclose(sum(MultiTeacher([mlp(4), mlp(8)], weights=[0.3, 1.1]).weights), 1.0)
    for bad in ([1, -1], [0, 0], [1, float("nan")]):
        with pytest.raises(ValueError):
            normalise_weights(bad, 2)
    with pytest.raises(ValueError, match="2 teachers"):
        MultiTeacher([mlp(4), mlp(8)], weights=[1.0])


def test_probability_mode_returns_t_log_of_the_weighted_mean_of_softened_probabilities() -> None:
    za, zb = torch.randn(5, CLASSES), torch.randn(5, CLASSES) * 3
    t = 4.0
    ensemble = MultiTeacher([Fixed(za), Fixed(zb)], weights=[1, 3], temperature=t)
    out = ensemble(torch.zeros(5, DIM))
    mean_p = 0.25 * torch.softmax(za / t, -1) + 0.75 * torch.softmax(zb / t, -1)
    torch.testing.assert_close(out, t * mean_p.log())
    torch.testing.assert_close(torch.softmax(out / t, -1), mean_p)
    # so a KD term at the same temperature distils towards exactly that average
    student = torch.randn(5, CLASSES)
    expected = t * t * (mean_p * (mean_p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(student, out, t), expected)


def test_logit_mode_averages_logits() -> None:
    za, zb = torch.randn(5, CLASSES), torch.randn(5, CLASSES)
    ensemble = MultiTeacher([Fixed(za), Fixed(zb)], weights=[3, 1], mode="logits")
    torch.testing.assert_close(ensemble(torch.zeros(5, DIM)), 0.75 * za + 0.25 * zb)


def test_a_zero_weight_teacher_has_no_influence() -> None:
    za, zb = torch.randn(5, CLASSES), torch.randn(5, CLASSES)
    ensemble = MultiTeacher([Fixed(za), Fixed(zb)], weights=[1, 0], temperature=2.0)
    torch.testing.assert_close(ensemble(torch.zeros(5, DIM)), 2.0 * torch.log_softmax(za / 2.0, -1))


def test_confidence_weights_favour_the_surer_teacher_per_sample() -> None:
    sure, unsure = torch.tensor([10.0, 0, 0, 0]), torch.zeros(CLASSES)
    za = torch.stack([sure, unsure])  # teacher A sure on row 0 only
    zb = torch.stack([unsure, sure.roll(1)])  # teacher B sure on row 1 only
    for kind in ("max_prob", "entropy"):
        ensemble = MultiTeacher([Fixed(za), Fixed(zb)], confidence_weighting=kind, mode="logits")
        w = ensemble.sample_weights([za, zb])  # (2 teachers, 2 rows)
        torch.testing.assert_close(w.sum(0), torch.ones(2))
        assert w[0, 0] > 0.7 and w[1, 1] > 0.7
        c = confidence_scores(torch.stack([sure, unsure]), kind)
        expected = (c[0] / (c[0] + c[1])).item()
        assert w[0, 0].item() == pytest.approx(expected)
    uniform = confidence_scores(torch.zeros(1, CLASSES), "entropy")
    assert uniform.item() == pytest.approx(0.0, abs=1e-6)
    assert MultiTeacher([mlp(4), mlp(8)], confidence_weighting=True).confidence == "max_prob"


def test_teachers_are_frozen_and_stay_in_eval_mode() -> None:
    teachers = [nn.Sequential(nn.Linear(DIM, 8), nn.Dropout(0.5), nn.Linear(8, CLASSES)), mlp(16)]
    ensemble = MultiTeacher(teachers)
    assert not any(p.requires_grad for p in ensemble.parameters())
    ensemble.train()
    assert not any(m.training for t in ensemble.teachers.values() for m in t.modules())
    distiller = Distiller(mlp(8), [LossTerm("kd", KDLoss(4.0), 1.0)], ensemble)
    distiller.train()
    x, _ = blobs(8)
    out = distiller(x)
    out["loss"].backward()
    assert all(p.grad is None for p in ensemble.parameters())
    assert set(distiller.trainable_parameters()) == set(distiller.student.parameters())
    assert not any(k.startswith("teacher") for k in distiller.trainable_state_dict())


def test_teachers_of_different_architectures_with_per_teacher_feature_terms() -> None:
    conv_teacher = nn.Sequential(
        nn.Unflatten(1, (1, 3, 4)),
        nn.Conv2d(1, 5, 3, padding=1),
        nn.Flatten(),
        nn.Linear(60, CLASSES),
    )
    ensemble = MultiTeacher({"mlp": mlp(16), "conv": conv_teacher}, weights=[1, 1])
    student = mlp(8)
    terms = [
        LossTerm("kd", KDLoss(4.0), 1.0),
        LossTerm(
            "hint_mlp", HintLoss(), 0.5, student="1", teacher="teachers.mlp.1", adapter="auto"
        ),
        LossTerm(
            "hint_conv", HintLoss(), 0.5, student="1", teacher="teachers.conv.2", adapter="auto"
        ),
    ]
    distiller = Distiller(student, terms, ensemble)
    x, _ = blobs(8)
    assert distiller.build_adapters(x) == ["hint_mlp", "hint_conv"]
    out = distiller(x)
    assert {"kd_loss", "hint_mlp_loss", "hint_conv_loss"} <= set(out)
    out["loss"].backward()
    assert student[0].weight.grad is not None
    # the teacher-output cache works with the ensemble too
    cached = cache_teacher_outputs(ensemble, distiller.teacher_keys, x, batch_size=4)
    assert set(cached) == {"teacher.logits", "teacher.teachers.conv.2", "teacher.teachers.mlp.1"}
    torch.testing.assert_close(cached["teacher.logits"], ensemble(x))
    torch.testing.assert_close(cached["teacher.teachers.mlp.1"], ensemble.teachers["mlp"][:2](x))
