"""Specification tests for the dense-prediction distillation losses (kdistill.losses.dense).

Each loss is checked against its paper's formula written as a slow loop over batch, channel
and position with ``math`` only, against invariants, and with gradcheck in float64. CWD is
also checked on a case computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kdistill.dense.boxes import decode_ltrb, generalized_box_iou
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses.dense import (
    BoxKDLoss,
    ChannelWiseDistillationLoss,
    HeatmapKDLoss,
    PearsonFeatureLoss,
    PixelKDLoss,
    box_kd_loss,
    channel_wise_distillation_loss,
    heatmap_kd_loss,
    pearson_feature_loss,
    pixel_kd_loss,
)
from kdistill.losses.registry import LOSSES

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# -- slow references ---------------------------------------------------------------------


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def cwd_reference(s: Tensor, t: Tensor, tau: float) -> float:
    b, c = s.shape[:2]
    total = 0.0
    for i in range(b):
        for k in range(c):
            p_t = _softmax([v / tau for v in t[i, k].flatten().tolist()])
            p_s = _softmax([v / tau for v in s[i, k].flatten().tolist()])
            total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    return tau**2 * total / (b * c)


def pkd_reference(s: Tensor, t: Tensor) -> float:
    """½ · mean over elements of the squared difference of per-channel z-scores."""
    c = s.shape[1]
    total, count = 0.0, 0
    for k in range(c):
        xs, xt = s[:, k].flatten().tolist(), t[:, k].flatten().tolist()
        n = len(xs)
        ms, mt = sum(xs) / n, sum(xt) / n
        sd_s = math.sqrt(sum((v - ms) ** 2 for v in xs) / n)
        sd_t = math.sqrt(sum((v - mt) ** 2 for v in xt) / n)
        for a, b in zip(xs, xt, strict=True):
            total += ((a - ms) / sd_s - (b - mt) / sd_t) ** 2
            count += 1
    return total / count / 2


def pearson_r(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def pixel_kd_reference(
    s: Tensor, t: Tensor, tau: float, target: Tensor | None, ignore: int
) -> float:
    b, c, h, w = s.shape
    total, count = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if target is not None and int(target[i, y, x]) == ignore:
                    continue
                p_t = _softmax([float(t[i, k, y, x]) / tau for k in range(c)])
                p_s = _softmax([float(s[i, k, y, x]) / tau for k in range(c)])
                total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
                count += 1
    return tau**2 * total / max(count, 1)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def heatmap_reference(s: Tensor, t: Tensor, weight: Tensor | None, tau: float) -> float:
    num, den = 0.0, 0.0
    w_full = None if weight is None else weight.expand_as(s)
    for idx in range(s.numel()):
        pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(idx), s.shape))
        p, q = _sigmoid(float(t[pos]) / tau), _sigmoid(float(s[pos]) / tau)
        kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        w = 1.0 if w_full is None else float(w_full[pos])
        num += w * kl * tau**2
        den += w
    return num / den


def giou_reference(a: list[float], b: list[float]) -> float:
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


# -- CWD -----------------------------------------------------------------------------------


def test_cwd_hand_computed_case() -> None:
    # one map of 2 positions: teacher logits (0, ln 3) -> p_t = (1/4, 3/4); student (0, 0) -> (1/2, 1/2)
    teacher = torch.tensor([[[[0.0, math.log(3.0)]]]], dtype=F64)  # (1, 1, 1, 2)
    student = torch.zeros_like(teacher)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
    assert channel_wise_distillation_loss(student, teacher, 1.0).item() == pytest.approx(
        kl, rel=1e-12
    )
    # at τ = 2: p_t ∝ (1, √3), and the KL is multiplied by τ² = 4
    p = 1 / (1 + math.sqrt(3))
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert channel_wise_distillation_loss(student, teacher, 2.0).item() == pytest.approx(
        4 * kl2, rel=1e-12
    )
    # a second, identical channel halves the average over channels (÷ C)
    two = torch.cat([teacher, teacher + 5.0], dim=1)
    students = torch.cat([student, teacher + 5.0], dim=1)
    assert channel_wise_distillation_loss(students, two, 1.0).item() == pytest.approx(
        kl / 2, rel=1e-12
    )


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_loop_reference(tau: float) -> None:
    s, t = _randn(2, 3, 4, 5, seed=1, scale=3), _randn(2, 3, 4, 5, seed=2, scale=3)
    assert channel_wise_distillation_loss(s, t, tau).item() == pytest.approx(
        cwd_reference(s, t, tau), rel=1e-10
    )
    assert ChannelWiseDistillationLoss(tau)(s, t).item() == pytest.approx(
        cwd_reference(s, t, tau), rel=1e-10
    )


def test_cwd_is_zero_for_equal_maps_and_ignores_a_per_channel_shift() -> None:
    t = _randn(2, 3, 4, 4, seed=3)
    assert channel_wise_distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)
    shifted = t + _randn(1, 3, 1, 1, seed=4) * 10  # a constant per channel: same softmax over H·W
    assert channel_wise_distillation_loss(shifted, t).item() == pytest.approx(0.0, abs=1e-10)


# -- PKD -----------------------------------------------------------------------------------


def test_pkd_matches_loop_reference() -> None:
    s, t = _randn(2, 3, 4, 4, seed=5), _randn(2, 3, 4, 4, seed=6, scale=7) + 2
    assert pearson_feature_loss(s, t, eps=0.0).item() == pytest.approx(
        pkd_reference(s, t), rel=1e-10
    )


def test_pkd_is_one_minus_the_mean_pearson_correlation_of_the_channels() -> None:
    s, t = _randn(3, 4, 2, 3, seed=7), _randn(3, 4, 2, 3, seed=8)
    rs = [pearson_r(s[:, k].flatten().tolist(), t[:, k].flatten().tolist()) for k in range(4)]
    assert pearson_feature_loss(s, t, eps=0.0).item() == pytest.approx(1 - sum(rs) / 4, rel=1e-10)


def test_pkd_ignores_a_per_channel_affine_change_of_the_teacher() -> None:
    s, t = _randn(2, 3, 4, 4, seed=9), _randn(2, 3, 4, 4, seed=10)
    scale, shift = _randn(1, 3, 1, 1, seed=11).abs() * 50 + 0.1, _randn(1, 3, 1, 1, seed=12) * 100
    assert PearsonFeatureLoss(eps=0.0)(s, t * scale + shift).item() == pytest.approx(
        pearson_feature_loss(s, t, eps=0.0).item(), rel=1e-9
    )
    assert pearson_feature_loss(t, t * scale + shift, eps=0.0).item() == pytest.approx(
        0.0, abs=1e-12
    )


# -- pixel-wise KD -------------------------------------------------------------------------


def test_pixel_kd_matches_loop_reference_and_skips_ignored_pixels() -> None:
    s, t = _randn(2, 4, 3, 3, seed=13, scale=2), _randn(2, 4, 3, 3, seed=14, scale=2)
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    target[0, 0, :] = -100
    target[1, 2, 1] = -100
    for tau in (1.0, 3.0):
        assert pixel_kd_loss(s, t, tau).item() == pytest.approx(
            pixel_kd_reference(s, t, tau, None, -100), rel=1e-10
        )
        expected = pixel_kd_reference(s, t, tau, target, -100)
        assert PixelKDLoss(tau)(s, t, target).item() == pytest.approx(expected, rel=1e-10)
    # a NaN in an ignored pixel does not leak into the value
    s_nan = s.clone()
    s_nan[0, :, 0, 0] = float("nan")
    assert torch.isfinite(pixel_kd_loss(s_nan, t, 1.0, target))


def test_pixel_kd_is_zero_when_every_pixel_is_ignored() -> None:
    s, t = _randn(1, 3, 2, 2, seed=15), _randn(1, 3, 2, 2, seed=16)
    assert pixel_kd_loss(s, t, 1.0, torch.full((1, 2, 2), -100)).item() == 0.0


# -- detection heads -----------------------------------------------------------------------


def test_heatmap_kd_matches_loop_reference() -> None:
    s, t = _randn(2, 3, 3, 4, seed=17, scale=3), _randn(2, 3, 3, 4, seed=18, scale=3)
    weight = _randn(2, 1, 3, 4, seed=19).abs()
    for tau in (1.0, 2.0):
        assert heatmap_kd_loss(s, t, None, tau).item() == pytest.approx(
            heatmap_reference(s, t, None, tau), rel=1e-10
        )
        assert heatmap_kd_loss(s, t, weight, tau).item() == pytest.approx(
            heatmap_reference(s, t, weight, tau), rel=1e-10
        )
    assert heatmap_kd_loss(t, t, weight).item() == pytest.approx(0.0, abs=1e-12)


def test_heatmap_kd_module_weights_by_the_teacher_foreground() -> None:
    s, t = _randn(2, 3, 4, 4, seed=20, scale=3), _randn(2, 3, 4, 4, seed=21, scale=3)
    expected_w = torch.sigmoid(t).amax(1, keepdim=True) + 0.05
    got = HeatmapKDLoss(weighting="teacher", background=0.05)(s, t)
    assert got.item() == pytest.approx(heatmap_reference(s, t, expected_w, 1.0), rel=1e-10)
    assert HeatmapKDLoss(weighting="none")(s, t).item() == pytest.approx(
        heatmap_reference(s, t, None, 1.0), rel=1e-10
    )


def test_heatmap_kd_gt_weighting_needs_and_uses_the_box_target() -> None:
    s, t = _randn(1, 2, 4, 4, seed=22), _randn(1, 2, 4, 4, seed=23)
    loss = HeatmapKDLoss(weighting="gt", background=0.0, stride=4.0)
    assert loss.requires_target
    target = torch.tensor([[[0.0, 0.0, 8.0, 8.0, 1.0]]], dtype=F64)  # one box around cell (0, 0)
    value = loss(s, t, target)
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match="needs the padded box target"):
        loss(s, t, None)


def test_generalized_box_iou_on_a_hand_computed_pair() -> None:
    a = torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=F64)
    b = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=F64)
    # intersection 1, union 7, enclosing box 9: GIoU = 1/7 − 2/9
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, rel=1e-12)
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)


def test_box_kd_matches_loop_reference() -> None:
    corner = _randn(5, 2, seed=24, scale=5)
    s = torch.cat([corner, corner + _randn(5, 2, seed=25).abs() * 4 + 1], -1)
    t = s + _randn(5, 4, seed=26)
    t[:, 2:] = torch.maximum(t[:, 2:], t[:, :2] + 0.5)
    w = torch.tensor([0.0, 0.5, 1.0, 0.2, 0.0], dtype=F64)
    rows = list(zip(s.tolist(), t.tolist(), w.tolist(), strict=True))
    giou = sum(wi * (1 - giou_reference(a, b)) for a, b, wi in rows) / float(w.sum())
    l1 = sum(
        wi * sum(abs(x - y) for x, y in zip(a, b, strict=True)) / (4 * 2.0) for a, b, wi in rows
    ) / float(w.sum())
    assert box_kd_loss(s, t, w, "giou").item() == pytest.approx(giou, rel=1e-10)
    assert box_kd_loss(s, t, w, "l1", scale=2.0).item() == pytest.approx(l1, rel=1e-10)
    assert box_kd_loss(s, t, torch.zeros(5, dtype=F64)).item() == 0.0


def test_box_kd_module_distils_only_where_the_teacher_is_confident() -> None:
    c, stride = 2, 4.0
    student = torch.cat([_randn(1, c, 3, 3, seed=27), _randn(1, 4, 3, 3, seed=28).abs() * 8], 1)
    teacher = torch.cat(
        [_randn(1, c, 3, 3, seed=29, scale=3), _randn(1, 4, 3, 3, seed=30).abs() * 8], 1
    )
    conf = torch.sigmoid(teacher[:, :c]).amax(1)  # (1, 3, 3)
    weight = torch.where(conf >= 0.6, conf, 0.0)
    expected = box_kd_loss(
        decode_ltrb(student[:, c:], stride), decode_ltrb(teacher[:, c:], stride), weight
    )
    got = BoxKDLoss(num_classes=c, stride=stride, threshold=0.6)(student, teacher)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    # cell (i, j) decodes around pixel ((j + ½)·s, (i + ½)·s)
    boxes = decode_ltrb(torch.ones(1, 4, 3, 3, dtype=F64), stride)
    assert boxes[0, 1, 2].tolist() == [9.0, 5.0, 11.0, 7.0]
    with pytest.raises(ValueError, match="num_classes"):
        BoxKDLoss(num_classes=3)(student, teacher)


# -- gradients, shapes, registry -----------------------------------------------------------


def test_gradcheck_in_float64() -> None:
    s = _randn(1, 2, 2, 3, seed=31).requires_grad_()
    t = _randn(1, 2, 2, 3, seed=32)
    w = _randn(1, 1, 2, 3, seed=33).abs() + 0.1
    target = torch.tensor([[[0, -100, 1], [1, 0, -100]]])
    assert torch.autograd.gradcheck(lambda x: channel_wise_distillation_loss(x, t, 2.0), (s,))
    assert torch.autograd.gradcheck(lambda x: pearson_feature_loss(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: pixel_kd_loss(x, t, 2.0, target), (s,))
    assert torch.autograd.gradcheck(lambda x: heatmap_kd_loss(x, t, w, 2.0), (s,))
    corner = _randn(4, 2, seed=34)
    boxes = torch.cat([corner, corner + 2.0], -1).requires_grad_()
    ref = torch.cat([corner + 0.3, corner + 1.5], -1)
    bw = torch.tensor([0.2, 1.0, 0.0, 0.7], dtype=F64)
    assert torch.autograd.gradcheck(lambda x: box_kd_loss(x, ref, bw, "giou"), (boxes,))
    assert torch.autograd.gradcheck(lambda x: box_kd_loss(x, ref, bw, "l1"), (boxes,))


def test_feature_losses_name_the_fix_for_different_shapes() -> None:
    with pytest.raises(ValueError, match="adapter"):
        channel_wise_distillation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pearson_feature_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_dense_losses_are_registered_by_name() -> None:
    assert isinstance(LOSSES.build("cwd", temperature=2.0), ChannelWiseDistillationLoss)
    assert isinstance(LOSSES.build("pkd"), PearsonFeatureLoss)
    assert isinstance(LOSSES.build("pixel_kd"), PixelKDLoss)
    assert isinstance(LOSSES.build("heatmap_kd"), HeatmapKDLoss)
    assert isinstance(LOSSES.build("box_kd", num_classes=3), BoxKDLoss)


class _Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, width, 3, padding=1)
        self.out = nn.Conv2d(width, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.feat(x)))


@pytest.mark.parametrize("name", ["cwd", "pkd"])
def test_feature_terms_get_an_adapter_for_a_narrower_student(name: str) -> None:
    student, teacher = _Tiny(3), _Tiny(8)
    term = LossTerm(name, LOSSES.build(name), student="feat", teacher="feat", adapter="auto")
    distiller = Distiller(student, [term], teacher)
    x = torch.randn(2, 1, 6, 6)
    assert distiller.build_adapters(x) == [name]
    out = distiller(x)
    out["loss"].backward()
    assert student.feat.weight.grad is not None and term.adapter[0].weight.grad is not None
