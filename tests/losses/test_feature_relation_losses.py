"""Specification tests for the feature and relation losses.

FitNets (`hint_loss`), attention transfer (`attention_transfer_loss`), cosine
hidden-state matching (`cosine_loss`), RKD (`rkd_*_loss`), similarity-preserving
(`similarity_preserving_loss`), PKT (`pkt_loss`) and correlation congruence
(`correlation_congruence_loss`). Every value is checked against a slow textbook
reference written with loops and `math` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from kdistill.losses.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from kdistill.losses.correlation import CorrelationCongruenceLoss, correlation_congruence_loss
from kdistill.losses.cosine import CosineLoss, cosine_loss
from kdistill.losses.fitnets import HintLoss, hint_loss
from kdistill.losses.pkt import PKTLoss, pkt_loss
from kdistill.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss, rkd_loss
from kdistill.losses.similarity import SimilarityPreservingLoss, similarity_preserving_loss

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _rows(x: Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


# --------------------------------------------------------------------------- textbook references


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


def _unit(v: list[float]) -> list[float]:
    n = _norm(v)
    return [a / n for a in v] if n > 0 else [0.0] * len(v)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _ref_hint(s: Tensor, t: Tensor) -> float:
    a, b = s.flatten().tolist(), t.flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


def _ref_attention_map(f: Tensor, p: float) -> list[list[float]]:
    b, c, h, w = f.shape
    maps = []
    for i in range(b):
        m = [
            sum(abs(f[i, ch, y, x].item()) ** p for ch in range(c)) / c
            for y in range(h)
            for x in range(w)
        ]
        maps.append(_unit(m))
    return maps


def _ref_at(s: Tensor, t: Tensor, p: float) -> float:
    a_s, a_t = _ref_attention_map(s, p), _ref_attention_map(t, p)
    total = sum(
        (x - y) ** 2 for rs, rt in zip(a_s, a_t, strict=True) for x, y in zip(rs, rt, strict=True)
    )
    return total / (len(a_s) * len(a_s[0]))


def _ref_block_mean(f: Tensor, k: int) -> Tensor:
    """Average k×k blocks with loops (what adaptive pooling does for an exact multiple)."""
    b, c, h, w = f.shape
    out = torch.zeros(b, c, h // k, w // k, dtype=f.dtype)
    for i in range(b):
        for ch in range(c):
            for y in range(h // k):
                for x in range(w // k):
                    out[i, ch, y, x] = sum(
                        f[i, ch, y * k + dy, x * k + dx].item()
                        for dy in range(k)
                        for dx in range(k)
                    ) / (k * k)
    return out


def _ref_cosine(s: Tensor, t: Tensor) -> float:
    rows_s, rows_t = s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()
    total = sum(1 - _dot(a, b) / (_norm(a) * _norm(b)) for a, b in zip(rows_s, rows_t, strict=True))
    return total / len(rows_s)


def _ref_distances(e: list[list[float]]) -> list[list[float]]:
    n = len(e)
    d = [
        [_norm([a - b for a, b in zip(e[i], e[j], strict=True)]) for j in range(n)]
        for i in range(n)
    ]
    mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[v / mean for v in row] for row in d]


def _ref_rkd_distance(s: Tensor, t: Tensor) -> float:
    ds, dt = _ref_distances(_rows(s)), _ref_distances(_rows(t))
    n = len(ds)
    return sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _ref_angle(e: list[list[float]], i: int, j: int, k: int) -> float:
    u = _unit([a - b for a, b in zip(e[j], e[i], strict=True)])
    v = _unit([a - b for a, b in zip(e[k], e[i], strict=True)])
    return _dot(u, v)


def _ref_rkd_angle(s: Tensor, t: Tensor) -> float:
    es, et = _rows(s), _rows(t)
    n = len(es)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                total += _huber(_ref_angle(es, i, j, k) - _ref_angle(et, i, j, k))
    return total / n**3


def _ref_sp(s: Tensor, t: Tensor) -> float:
    def sim(e: list[list[float]]) -> list[list[float]]:
        return [_unit([_dot(a, b) for b in e]) for a in e]

    gs, gt = sim(_rows(s)), sim(_rows(t))
    n = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def _ref_pkt(s: Tensor, t: Tensor, eps: float = 1e-7) -> float:
    def probs(e: list[list[float]]) -> list[list[float]]:
        u = [[a / (_norm(r) + eps) for a in r] for r in e]
        k = [[(_dot(a, b) + 1) / 2 for b in u] for a in u]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(_rows(s)), probs(_rows(t))
    n = len(ps)
    total = sum(
        pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)
    )
    return total / n**2


def _ref_cc(s: Tensor, t: Tensor, gamma: float, order: int, exact: bool = False) -> float:
    def kernel(e: list[list[float]]) -> list[list[float]]:
        u = [_unit(r) for r in e]
        out = []
        for a in u:
            row = []
            for b in u:
                if exact:  # the RBF kernel the Taylor series approximates
                    row.append(
                        math.exp(-gamma * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
                    )
                else:
                    c = _dot(a, b)
                    row.append(
                        sum(
                            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p
                            for p in range(order + 1)
                        )
                    )
            out.append(row)
        return out

    ks, kt = kernel(_rows(s)), kernel(_rows(t))
    n = len(ks)
    return sum((ks[i][j] - kt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


# --------------------------------------------------------------------------- values vs references


def _close(value: Tensor, expected: float) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hint_loss_matches_textbook_mse() -> None:
    s, t = _randn(2, 3, 2, 2), _randn(2, 3, 2, 2, seed=1)
    _close(hint_loss(s, t), _ref_hint(s, t))


def test_hint_loss_equals_torch_mse_loss() -> None:
    s, t = _randn(3, 5), _randn(3, 5, seed=1)
    torch.testing.assert_close(hint_loss(s, t), F.mse_loss(s, t))


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_transfer_matches_textbook_reference(p: float) -> None:
    s, t = _randn(2, 3, 3, 2), _randn(2, 5, 3, 2, seed=1)  # different channel counts
    _close(attention_transfer_loss(s, t, p), _ref_at(s, t, p))


def test_attention_transfer_pools_the_larger_map_to_the_smaller_size() -> None:
    s, t = _randn(2, 2, 4, 4), _randn(2, 3, 2, 2, seed=1)
    expected = _ref_at(_ref_block_mean(s, 2), t, 2.0)
    _close(attention_transfer_loss(s, t), expected)
    _close(attention_transfer_loss(t, s), _ref_at(t, _ref_block_mean(s, 2), 2.0))


def test_attention_transfer_matches_reference_implementation() -> None:
    s, t = _randn(2, 3, 4, 4), _randn(2, 6, 4, 4, seed=1)

    def at(f: Tensor) -> Tensor:  # RepDistiller's Attention.at
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    torch.testing.assert_close(attention_transfer_loss(s, t), (at(s) - at(t)).pow(2).mean())


def test_attention_map_is_unit_norm_per_sample_of_shape_b_hw() -> None:
    a = attention_map(_randn(3, 4, 2, 5), p=2.0)
    assert a.shape == (3, 10)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3, dtype=F64))
    assert attention_map(torch.zeros(1, 2, 2, 2)).abs().sum().item() == 0.0


def test_attention_transfer_on_1d_feature_maps_b_c_l() -> None:
    s, t = _randn(2, 3, 6), _randn(2, 4, 3, seed=1)  # length 6 is pooled to 3
    pooled = F.avg_pool1d(s, 2)  # (2, 3, 3)
    expected = _ref_at(pooled.unsqueeze(-1), t.unsqueeze(-1), 2.0)  # as (B, C, L, 1) maps
    _close(attention_transfer_loss(s, t), expected)


def test_cosine_loss_matches_textbook_reference() -> None:
    s, t = _randn(2, 3, 4), _randn(2, 3, 4, seed=1)
    _close(cosine_loss(s, t), _ref_cosine(s, t))


def test_cosine_loss_equals_cosine_embedding_loss_with_target_one() -> None:
    s, t = _randn(5, 4), _randn(5, 4, seed=1)
    expected = F.cosine_embedding_loss(s, t, torch.ones(5, dtype=F64))
    torch.testing.assert_close(cosine_loss(s, t), expected)


def test_rkd_distance_loss_matches_textbook_reference() -> None:
    s, t = _randn(5, 3), _randn(5, 4, seed=1)  # different embedding sizes
    _close(rkd_distance_loss(s, t), _ref_rkd_distance(s, t))


def test_rkd_angle_loss_matches_textbook_reference() -> None:
    s, t = _randn(4, 3), _randn(4, 2, seed=1)
    _close(rkd_angle_loss(s, t), _ref_rkd_angle(s, t))


def test_rkd_loss_is_weighted_sum_with_repdistiller_defaults() -> None:
    s, t = _randn(4, 2, 2), _randn(4, 3, seed=1)
    expected = 25 * _ref_rkd_distance(s, t) + 50 * _ref_rkd_angle(s, t)
    _close(rkd_loss(s, t), expected)
    _close(rkd_loss(s, t, 2.0, 0.0), 2 * _ref_rkd_distance(s, t))
    _close(rkd_loss(s, t, 0.0, 3.0), 3 * _ref_rkd_angle(s, t))


def test_rkd_loss_matches_reference_implementation() -> None:
    s, t = _randn(5, 3), _randn(5, 4, seed=1)

    def pdist(e: Tensor) -> Tensor:  # RepDistiller's RKDLoss.pdist
        sq = e.pow(2).sum(1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def angles(e: Tensor) -> Tensor:
        d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(d, d.transpose(1, 2)).view(-1)

    ds, dt = pdist(s), pdist(t)
    loss_d = F.smooth_l1_loss(ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean())
    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    torch.testing.assert_close(rkd_loss(s, t), 25 * loss_d + 50 * loss_a)


def test_similarity_preserving_matches_textbook_reference() -> None:
    s, t = _randn(4, 2, 3), _randn(4, 5, seed=1)
    _close(similarity_preserving_loss(s, t), _ref_sp(s, t))


def test_pkt_matches_textbook_reference() -> None:
    s, t = _randn(4, 3), _randn(4, 5, seed=1)
    _close(pkt_loss(s, t), _ref_pkt(s, t))


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 3)])
def test_correlation_congruence_matches_textbook_reference(gamma: float, order: int) -> None:
    s, t = _randn(4, 3), _randn(4, 3, seed=1)
    _close(correlation_congruence_loss(s, t, gamma, order), _ref_cc(s, t, gamma, order))


def test_correlation_congruence_high_order_tends_to_exact_rbf_kernel() -> None:
    s, t = _randn(4, 3), _randn(4, 3, seed=1)
    exact = _ref_cc(s, t, 0.4, 0, exact=True)
    assert correlation_congruence_loss(s, t, 0.4, 20).item() == pytest.approx(exact, rel=1e-9)
    assert correlation_congruence_loss(s, t, 0.4, 2).item() != pytest.approx(exact, rel=1e-3)


# --------------------------------------------------------------------------- invariants

Loss = Callable[[Tensor, Tensor], Tensor]

ALL_LOSSES: dict[str, tuple[Loss, tuple[int, ...]]] = {
    "hint": (hint_loss, (4, 3, 2, 2)),
    "attention": (attention_transfer_loss, (4, 3, 2, 2)),
    "cosine": (cosine_loss, (4, 3, 2)),
    "rkd": (rkd_loss, (4, 3)),
    "rkd_distance": (rkd_distance_loss, (4, 3)),
    "rkd_angle": (rkd_angle_loss, (4, 3)),
    "similarity": (similarity_preserving_loss, (4, 6)),
    "pkt": (pkt_loss, (4, 3)),
    "correlation": (correlation_congruence_loss, (4, 3)),
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_loss_is_zero_for_identical_student_and_teacher(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    x = _randn(*shape)
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_loss_is_positive_for_different_inputs(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    assert loss(_randn(*shape), _randn(*shape, seed=1)).item() > 0


@pytest.mark.parametrize(
    "name", ["rkd", "rkd_distance", "rkd_angle", "similarity", "pkt", "correlation"]
)
def test_relational_loss_is_invariant_to_permuting_the_batch(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    s, t = _randn(*shape), _randn(*shape, seed=1)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(loss(s[perm], t[perm]), loss(s, t))


@pytest.mark.parametrize("name", ["rkd", "rkd_distance", "rkd_angle", "similarity", "correlation"])
def test_relational_loss_is_invariant_to_scaling_either_embedding(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    s, t = _randn(*shape), _randn(*shape, seed=1)
    base = loss(s, t)
    torch.testing.assert_close(loss(3.0 * s, 3.0 * t), base)
    torch.testing.assert_close(loss(0.2 * s, t), base)
    torch.testing.assert_close(loss(s, 7.0 * t), base)


def test_rkd_is_invariant_to_translating_and_rotating_the_embeddings() -> None:
    s, t = _randn(5, 3), _randn(5, 2, seed=1)
    rotation, _ = torch.linalg.qr(_randn(3, 3, seed=2))
    shift = 100.0 * _randn(1, 3, seed=3)
    torch.testing.assert_close(rkd_loss(s @ rotation + shift, t), rkd_loss(s, t))


def test_attention_transfer_does_not_depend_on_student_channel_count() -> None:
    t = _randn(2, 3, 2, 3)
    widened = torch.cat([t, -t, t], dim=1)  # 9 channels, same mean_c F² per position
    assert attention_transfer_loss(widened, t).item() == pytest.approx(0.0, abs=1e-12)
    s1, s5 = _randn(2, 1, 2, 3, seed=1), _randn(2, 1, 2, 3, seed=1).expand(2, 5, 2, 3)
    torch.testing.assert_close(attention_transfer_loss(s5, t), attention_transfer_loss(s1, t))


def test_attention_transfer_is_invariant_to_scaling_either_feature_map() -> None:
    s, t = _randn(2, 3, 2, 2), _randn(2, 4, 2, 2, seed=1)
    torch.testing.assert_close(
        attention_transfer_loss(5.0 * s, 0.5 * t), attention_transfer_loss(s, t)
    )


def test_cosine_loss_is_invariant_to_positive_scaling_of_rows() -> None:
    s, t = _randn(2, 3, 4), _randn(2, 3, 4, seed=1)
    scale = torch.rand(2, 3, 1, generator=_gen(2), dtype=F64) * 10 + 0.1
    torch.testing.assert_close(cosine_loss(s * scale, t), cosine_loss(s, t))
    torch.testing.assert_close(cosine_loss(s, t * scale), cosine_loss(s, t))
    assert cosine_loss(s, -s).item() == pytest.approx(2.0)


def test_cosine_loss_with_mask_equals_loss_on_selected_rows() -> None:
    s, t = _randn(2, 3, 4), _randn(2, 3, 4, seed=1)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(cosine_loss(s, t, mask), cosine_loss(s[mask], t[mask]))
    s2 = s.clone()
    s2[~mask] = float("nan")
    torch.testing.assert_close(cosine_loss(s2, t, mask), cosine_loss(s, t, mask))


def test_cosine_loss_fully_masked_is_exactly_zero_with_zero_gradient() -> None:
    s = _randn(2, 3).requires_grad_()
    loss = cosine_loss(s, _randn(2, 3, seed=1), mask=torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_relational_losses_with_a_single_sample_are_zero() -> None:
    s, t = _randn(1, 3), _randn(1, 4, seed=1)
    for loss in (rkd_loss, similarity_preserving_loss, pkt_loss):
        assert loss(s, t).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- gradients

GRADCHECK_CASES: dict[str, tuple[Loss, tuple[int, ...], tuple[int, ...]]] = {
    "hint": (hint_loss, (2, 2, 2, 2), (2, 2, 2, 2)),
    "attention": (attention_transfer_loss, (2, 2, 2, 2), (2, 3, 2, 2)),
    "attention_pooled": (attention_transfer_loss, (2, 2, 4, 2), (2, 1, 2, 2)),
    "attention_p3": (lambda s, t: attention_transfer_loss(s, t, 3.0), (2, 2, 2, 2), (2, 3, 2, 2)),
    "cosine": (cosine_loss, (2, 3, 3), (2, 3, 3)),
    "rkd_distance": (rkd_distance_loss, (4, 3), (4, 2)),
    "rkd_angle": (rkd_angle_loss, (4, 3), (4, 2)),
    "similarity": (similarity_preserving_loss, (3, 4), (3, 2)),
    "pkt": (pkt_loss, (3, 4), (3, 2)),
    "correlation": (correlation_congruence_loss, (3, 3), (3, 3)),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_for_student_and_teacher_in_float64(name: str) -> None:
    loss, s_shape, t_shape = GRADCHECK_CASES[name]
    s = _randn(*s_shape).requires_grad_()
    t = _randn(*t_shape, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(loss, (s, t))


def test_cosine_loss_passes_gradcheck_with_a_mask() -> None:
    s, t = _randn(2, 3, 3).requires_grad_(), _randn(2, 3, 3, seed=1).requires_grad_()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.autograd.gradcheck(lambda a, b: cosine_loss(a, b, mask), (s, t))


def _with_duplicate(x: Tensor) -> Tensor:
    x = x.clone()
    x[2] = x[0]
    return x


@pytest.mark.parametrize(
    "name", ["rkd", "rkd_distance", "rkd_angle", "similarity", "pkt", "correlation"]
)
@pytest.mark.parametrize("duplicate_in", ["student", "teacher", "both"])
def test_identical_samples_in_the_batch_give_finite_gradients(name: str, duplicate_in: str) -> None:
    loss, shape = ALL_LOSSES[name]
    s, t = _randn(*shape, dtype=torch.float32), _randn(*shape, seed=1, dtype=torch.float32)
    if duplicate_in in ("student", "both"):
        s = _with_duplicate(s)
    if duplicate_in in ("teacher", "both"):
        t = _with_duplicate(t)
    s.requires_grad_()
    t.requires_grad_()
    value = loss(s, t)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(t.grad).all()
    assert s.grad.abs().max() < 1e3


def test_rkd_duplicate_samples_have_zero_distance_and_zero_angle() -> None:
    s = _with_duplicate(_randn(4, 3))
    ref_d, ref_a = (
        _ref_rkd_distance(s, _randn(4, 2, seed=1)),
        _ref_rkd_angle(s, _randn(4, 2, seed=1)),
    )
    _close(rkd_distance_loss(s, _randn(4, 2, seed=1)), ref_d)
    _close(rkd_angle_loss(s, _randn(4, 2, seed=1)), ref_a)


@pytest.mark.parametrize("name", ["attention", "cosine", "similarity", "pkt", "correlation"])
def test_all_zero_sample_gives_finite_gradients(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    s = _randn(*shape, dtype=torch.float32)
    s[1] = 0
    s.requires_grad_()
    value = loss(s, _randn(*shape, seed=1, dtype=torch.float32))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().max() < 1e3


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(min_value=0, max_value=5),
    dim=st.integers(min_value=1, max_value=3),
    scale=st.sampled_from([0.0, 1e-4, 1.0, 1e3]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_rkd_is_finite_with_finite_gradients_for_random_batches(
    batch: int, dim: int, scale: float, seed: int
) -> None:
    g = _gen(seed)
    s = (torch.randn(batch, dim, generator=g) * scale).requires_grad_()
    t = torch.randint(0, 2, (batch, dim), generator=g).float()  # many duplicate rows
    value = rkd_loss(s, t)
    value.backward()
    assert torch.isfinite(value)
    assert value.item() >= 0
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- dtypes / teacher


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    loss, shape = ALL_LOSSES[name]
    s, t = _randn(*shape, dtype=torch.float32), _randn(*shape, seed=1, dtype=torch.float32)
    value = loss(s.to(dtype), t.to(dtype))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(s.to(dtype).float(), t.to(dtype).float()))


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_teacher_from_inference_mode_can_be_used_with_a_trainable_student(name: str) -> None:
    loss, shape = ALL_LOSSES[name]
    with torch.inference_mode():
        t = _randn(*shape, seed=1, dtype=torch.float32) * 1.0
    s = _randn(*shape, dtype=torch.float32).requires_grad_()
    loss(s, t).backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- validation


def test_hint_loss_rejects_channel_mismatch_asking_for_an_adapter() -> None:
    with pytest.raises(ValueError, match=r"\(2, 32, 4, 4\) vs teacher \(2, 64, 4, 4\).*adapter"):
        hint_loss(torch.randn(2, 32, 4, 4), torch.randn(2, 64, 4, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        HintLoss()(torch.randn(2, 8), torch.randn(3, 8))


def test_attention_transfer_rejects_bad_shapes_and_p() -> None:
    with pytest.raises(ValueError, match=r"feature maps \(B, C, H, W\).*\(2, 8\)"):
        attention_transfer_loss(torch.randn(2, 8), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial dims"):
        attention_transfer_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    for p in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must be"):
            attention_transfer_loss(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), p)
        with pytest.raises(ValueError, match="p must be"):
            AttentionTransferLoss(p)


def test_cosine_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"hidden size 4 vs teacher 6.*nn\.Linear\(4, 6\)"):
        cosine_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) vs teacher \(2, 5, 4\)"):
        cosine_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        cosine_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "loss",
    [
        rkd_loss,
        rkd_distance_loss,
        rkd_angle_loss,
        similarity_preserving_loss,
        pkt_loss,
        correlation_congruence_loss,
    ],
)
def test_relational_losses_reject_different_batch_sizes(loss: Loss) -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) vs teacher \(5, 3\): batch sizes differ"):
        loss(torch.randn(4, 3), torch.randn(5, 3))


def test_correlation_congruence_rejects_different_embedding_sizes_asking_for_an_adapter() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) vs teacher \(4, 5\).*adapter"):
        correlation_congruence_loss(torch.randn(4, 3), torch.randn(4, 5))


@pytest.mark.parametrize(
    ("gamma", "order"), [(0.0, 2), (-1.0, 2), (float("nan"), 2), (0.4, 0), (0.4, 1.5), (0.4, True)]
)
def test_correlation_congruence_rejects_bad_hyper_parameters(gamma: float, order: int) -> None:
    with pytest.raises(ValueError, match=r"gamma|order"):
        correlation_congruence_loss(torch.randn(3, 2), torch.randn(3, 2), gamma, order)
    with pytest.raises(ValueError, match=r"gamma|order"):
        CorrelationCongruenceLoss(gamma, order)


@pytest.mark.parametrize("weights", [(-1.0, 50.0), (25.0, float("nan")), (float("inf"), 1.0)])
def test_rkd_rejects_negative_or_non_finite_weights(weights: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="weight must be"):
        rkd_loss(torch.randn(3, 2), torch.randn(3, 2), *weights)
    with pytest.raises(ValueError, match="weight must be"):
        RKDLoss(*weights)


def test_pkt_rejects_non_positive_eps() -> None:
    with pytest.raises(ValueError, match="eps"):
        pkt_loss(torch.randn(3, 2), torch.randn(3, 2), eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        PKTLoss(eps=-1.0)


def test_integer_features_are_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        hint_loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- modules

MODULE_CASES: list[tuple[nn.Module, Loss, tuple[int, ...], tuple[int, ...]]] = [
    (HintLoss(), hint_loss, (2, 3, 2, 2), (2, 3, 2, 2)),
    (
        AttentionTransferLoss(p=3.0),
        lambda s, t: attention_transfer_loss(s, t, 3.0),
        (2, 3, 4, 4),
        (2, 5, 2, 2),
    ),
    (CosineLoss(), cosine_loss, (2, 3, 4), (2, 3, 4)),
    (RKDLoss(1.0, 2.0), lambda s, t: rkd_loss(s, t, 1.0, 2.0), (4, 3), (4, 5)),
    (SimilarityPreservingLoss(), similarity_preserving_loss, (3, 2, 2), (3, 7)),
    (PKTLoss(eps=1e-5), lambda s, t: pkt_loss(s, t, 1e-5), (3, 4), (3, 2)),
    (
        CorrelationCongruenceLoss(0.5, 3),
        lambda s, t: correlation_congruence_loss(s, t, 0.5, 3),
        (3, 4),
        (3, 4),
    ),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: type(c[0]).__name__)
def test_module_is_parameter_free_and_equals_function(
    case: tuple[nn.Module, Loss, tuple[int, ...], tuple[int, ...]],
) -> None:
    module, function, s_shape, t_shape = case
    s, t = _randn(*s_shape), _randn(*t_shape, seed=1)
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(s, t), function(s, t))  # forward(student, teacher)
    repr(module)


def test_module_defaults_are_the_papers() -> None:
    assert AttentionTransferLoss().p == 2.0
    assert (RKDLoss().distance_weight, RKDLoss().angle_weight) == (25.0, 50.0)
    assert PKTLoss().eps == 1e-7
    cc = CorrelationCongruenceLoss()
    assert (cc.gamma, cc.order) == (0.4, 2)
