"""Specification tests for the modern logit / representation distillation losses.

Decoupled KD (`dkd_loss`, `dkd_parts`, `DKDLoss`), DIST (`dist_loss`,
`dist_parts`, `DISTLoss`) and contrastive representation distillation
(`crd_nce_loss`, `CRDLoss`). Values are checked against slow references
written from the papers' formulas with loops and `math` only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.crd import CRDLoss, crd_nce_loss
from kdistill.losses.dist import DISTLoss, dist_loss, dist_parts
from kdistill.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from kdistill.losses.kd import kd_loss

F64 = torch.float64
NEG_INF = float("-inf")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype) * scale


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


# =========================================================================== DKD


def _reference_dkd(
    student: list[list[float]], teacher: list[list[float]], target: list[int], temperature: float
) -> tuple[float, float]:
    """Paper eq. (1)–(5): binary b = [p_t, 1 − p_t] and non-target p̂, per row."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, target, strict=True):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        b_s = [p_s[y], 1.0 - p_s[y]]
        b_t = [p_t[y], 1.0 - p_t[y]]
        hat_s = [p_s[c] / (1.0 - p_s[y]) for c in range(len(s_row)) if c != y]
        hat_t = [p_t[c] / (1.0 - p_t[y]) for c in range(len(t_row)) if c != y]
        tckd += _kl(b_t, b_s)
        nckd += _kl(hat_t, hat_s)
    n = len(student)
    return temperature**2 * tckd / n, temperature**2 * nckd / n


def _dkd_inputs(rows: int = 5, classes: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    s = _randn(rows, classes, seed=0, scale=2.0)
    t = _randn(rows, classes, seed=1, scale=2.0)
    y = torch.randint(0, classes, (rows,), generator=_gen(2))
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_parts_match_slow_reference_from_the_paper(temperature: float) -> None:
    s, t, y = _dkd_inputs()
    tckd_ref, nckd_ref = _reference_dkd(s.tolist(), t.tolist(), y.tolist(), temperature)
    tckd, nckd = dkd_parts(s, t, y, temperature)
    assert tckd.item() == pytest.approx(tckd_ref, rel=1e-10, abs=1e-12)
    assert nckd.item() == pytest.approx(nckd_ref, rel=1e-10, abs=1e-12)


def test_dkd_loss_is_alpha_tckd_plus_beta_nckd() -> None:
    s, t, y = _dkd_inputs()
    tckd_ref, nckd_ref = _reference_dkd(s.tolist(), t.tolist(), y.tolist(), 4.0)
    assert dkd_loss(s, t, y).item() == pytest.approx(1.0 * tckd_ref + 8.0 * nckd_ref, rel=1e-10)
    value = dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=4.0).item()
    assert value == pytest.approx(0.5 * tckd_ref + 2.0 * nckd_ref, rel=1e-10)


@pytest.mark.parametrize(("seed", "temperature"), [(0, 1.0), (1, 2.0), (2, 4.0), (3, 0.5)])
def test_kd_equals_tckd_plus_one_minus_teacher_target_prob_times_nckd_per_row(
    seed: int, temperature: float
) -> None:
    # Paper eq. (6), an identity for each single row (T² on both sides).
    s = _randn(1, 7, seed=seed, scale=3.0)
    t = _randn(1, 7, seed=seed + 100, scale=3.0)
    y = torch.tensor([seed % 7])
    tckd, nckd = dkd_parts(s, t, y, temperature)
    p_t_target = torch.softmax(t / temperature, dim=-1)[0, y.item()]
    kd = kd_loss(s, t, temperature)
    torch.testing.assert_close(tckd + (1.0 - p_t_target) * nckd, kd, rtol=1e-10, atol=1e-12)
    # Hence DKD with alpha = beta = 1 never falls below KD (NCKD >= 0).
    assert dkd_loss(s, t, y, 1.0, 1.0, temperature).item() >= kd.item() - 1e-12


def test_dkd_is_zero_for_identical_logits() -> None:
    s, _, y = _dkd_inputs()
    tckd, nckd = dkd_parts(s, s.clone(), y)
    assert tckd.item() == pytest.approx(0.0, abs=1e-12)
    assert nckd.item() == pytest.approx(0.0, abs=1e-12)


def test_nckd_does_not_depend_on_the_target_logit() -> None:
    s, t, y = _dkd_inputs()
    s2, t2 = s.clone(), t.clone()
    rows = torch.arange(s.shape[0])
    s2[rows, y] += 5.0
    t2[rows, y] -= 3.0
    torch.testing.assert_close(dkd_parts(s2, t2, y)[1], dkd_parts(s, t, y)[1])


def test_dkd_passes_gradcheck_for_student_and_teacher_in_float64() -> None:
    s, t, y = _dkd_inputs(rows=3, classes=4)
    s.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dkd_loss(a, b, y, 0.7, 2.0, 2.0), (s, t))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
def test_dkd_with_extremely_confident_teacher_or_student_has_no_nan(
    temperature: float, dtype: torch.dtype
) -> None:
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 50.0, 0.0], [50.0, 0.0, 0.0]], dtype=dtype)
    t = torch.tensor([[50.0, 0.0, 0.0], [50.0, 0.0, 0.0], [50.0, 0.0, 0.0]], dtype=dtype)
    s.requires_grad_()
    t.requires_grad_()
    y = torch.tensor([0, 0, 0])
    tckd, nckd = dkd_parts(s, t, y, temperature)
    (tckd + 8.0 * nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    if temperature == 1.0:  # p_t ≈ 1 (1 − p_t ≈ 4e-22): TCKD of row 0 is ≈ KL([1, 0] ‖ [1/3, 2/3])
        assert tckd.item() > math.log(3.0) / 3


def test_dkd_teacher_minus_inf_at_non_target_classes_is_finite() -> None:
    s, t, y = _dkd_inputs(rows=3, classes=5)
    y = torch.tensor([0, 1, 2])
    t[0, [1, 3]] = NEG_INF  # some non-target classes impossible
    t[1, [0, 2, 3, 4]] = NEG_INF  # every non-target class impossible: p_t = 1
    s.requires_grad_()
    t.requires_grad_()
    tckd, nckd = dkd_parts(s, t, y, 2.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    ref = _reference_dkd(s[[0, 2]].tolist(), t[[0, 2]].tolist(), [0, 2], 2.0)
    # Row 1 has NCKD 0 and TCKD = T² · (−log p_s,y).
    p_s1 = torch.softmax(s.detach()[1] / 2.0, -1)[1].item()
    assert tckd.item() == pytest.approx((2 * ref[0] + 4.0 * -math.log(p_s1)) / 3, rel=1e-10)
    assert nckd.item() == pytest.approx(2 * ref[1] / 3, rel=1e-10)


def test_dkd_with_mask_equals_selected_rows_and_empty_mask_is_zero() -> None:
    s, t, y = _dkd_inputs(rows=6, classes=4)
    s, t, y = s.reshape(2, 3, 4), t.reshape(2, 3, 4), y.reshape(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    y_ignored = torch.where(mask, y, -100)
    torch.testing.assert_close(
        dkd_loss(s, t, y_ignored, mask=mask), dkd_loss(s[mask], t[mask], y[mask])
    )
    torch.testing.assert_close(
        dkd_loss(s, t, y), dkd_loss(s.reshape(6, 4), t.reshape(6, 4), y.reshape(6))
    )
    s.requires_grad_()
    empty = dkd_loss(s, t, y, mask=torch.zeros(2, 3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dkd_half_precision_gives_float32_close_to_float32(dtype: torch.dtype) -> None:
    s, t, y = _dkd_inputs()
    s, t = s.to(dtype), t.to(dtype)
    loss = dkd_loss(s, t, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, dkd_loss(s.float(), t.float(), y))


def test_dkd_rejects_bad_inputs_with_actionable_messages() -> None:
    s, t, y = _dkd_inputs(rows=2, classes=3)
    with pytest.raises(ValueError, match=r"in \[0, 3\).*mask out"):
        dkd_loss(s, t, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        dkd_loss(s, t, torch.tensor([-100, 1]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(s[:, :1], t[:, :1], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"target has shape \(3,\)"):
        dkd_loss(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        dkd_loss(s, t, y.double())
    with pytest.raises(ValueError, match="student has 3 classes, teacher has 4"):
        dkd_loss(s, torch.zeros(2, 4, dtype=F64), y)
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(s, t, y, temperature=0.0)
    for kwargs in ({"alpha": -1.0}, {"beta": float("nan")}):
        with pytest.raises(ValueError, match=r"(alpha|beta) must be a finite number >= 0"):
            dkd_loss(s, t, y, **kwargs)
        with pytest.raises(ValueError, match=r"(alpha|beta) must be a finite number >= 0"):
            DKDLoss(**kwargs)


def test_dkd_module_equals_function_and_declares_it_needs_targets() -> None:
    s, t, y = _dkd_inputs()
    module = DKDLoss(alpha=0.5, beta=4.0, temperature=2.0)
    assert DKDLoss.requires_target is True
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(s, t, y), dkd_loss(s, t, y, 0.5, 4.0, 2.0))
    assert "beta=4.0" in repr(module)


# =========================================================================== DIST


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(da, db, strict=True))
    den = math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db))
    return num / den  # the exact correlation: kdistill's relative eps is ~1e-8 of it


def _reference_dist(
    student: list[list[float]], teacher: list[list[float]], temperature: float
) -> tuple[float, float]:
    y_s = [_softmax(r, temperature) for r in student]
    y_t = [_softmax(r, temperature) for r in teacher]
    n, c = len(y_s), len(y_s[0])
    inter = 1.0 - sum(_pearson(y_s[i], y_t[i]) for i in range(n)) / n
    cols_s = [[y_s[i][k] for i in range(n)] for k in range(c)]
    cols_t = [[y_t[i][k] for i in range(n)] for k in range(c)]
    intra = 1.0 - sum(_pearson(cols_s[k], cols_t[k]) for k in range(c)) / c
    return temperature**2 * inter, temperature**2 * intra


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 100.0, 1000.0])
def test_dist_parts_match_slow_exact_pearson_at_every_temperature(temperature: float) -> None:
    s, t = _randn(5, 6, seed=0, scale=2.0), _randn(5, 6, seed=1, scale=2.0)
    inter_ref, intra_ref = _reference_dist(s.tolist(), t.tolist(), temperature)
    inter, intra = dist_parts(s, t, temperature)
    # exact up to a relative eps · ‖b_c‖² / ‖a_c‖² (6e-7 here for one low-spread class at T=0.5)
    assert inter.item() == pytest.approx(inter_ref, rel=1e-6)
    assert intra.item() == pytest.approx(intra_ref, rel=1e-6)
    expected = 0.5 * inter_ref + 2.0 * intra_ref
    assert dist_loss(s, t, 0.5, 2.0, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_dist_is_scale_free_where_the_authors_absolute_eps_is_not() -> None:
    """At T = 1e3 softened probabilities differ by ~1e-4: an absolute eps = 1e-8 in the
    denominator (Huang et al.'s code) moves ρ by ~1 %, the relative eps by ~1e-9."""
    s, t = _randn(8, 10, seed=20), _randn(8, 10, seed=21)
    y_s, y_t = torch.softmax(s / 1e3, -1), torch.softmax(t / 1e3, -1)
    a, b = y_s - y_s.mean(1, keepdim=True), y_t - y_t.mean(1, keepdim=True)
    exact = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    authors = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    inter, _ = dist_parts(s, t, 1e3)
    assert (authors - exact).abs().max() > 1e-3
    assert inter.item() == pytest.approx(1e6 * (1.0 - exact.mean().item()), rel=1e-7)


def test_dist_matches_numpy_corrcoef() -> None:
    s, t = _randn(4, 5, seed=3), _randn(4, 5, seed=4)
    y_s = torch.softmax(s, -1).numpy()
    y_t = torch.softmax(t, -1).numpy()
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(y_s[:, k], y_t[:, k])[0, 1] for k in range(5)])
    assert dist_loss(s, t).item() == pytest.approx(inter + intra, rel=1e-5)


def test_dist_is_zero_for_identical_logits() -> None:
    z = _randn(4, 6, seed=5, dtype=torch.float32)
    inter, intra = dist_parts(z, z.clone(), 2.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-5)
    assert intra.item() == pytest.approx(0.0, abs=1e-5)


def test_dist_is_invariant_to_per_row_constant_shift_of_either_logits() -> None:
    s, t = _randn(4, 6, seed=6), _randn(4, 6, seed=7)
    shift = _randn(4, 1, seed=8, scale=10.0)
    base = dist_loss(s, t, temperature=2.0)
    torch.testing.assert_close(dist_loss(s + shift, t, temperature=2.0), base)
    torch.testing.assert_close(dist_loss(s, t - shift, temperature=2.0), base)


def test_dist_passes_gradcheck_for_student_and_teacher_in_float64() -> None:
    s = _randn(3, 4, seed=9).requires_grad_()
    t = _randn(3, 4, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dist_loss(a, b, 0.7, 1.3, 2.0), (s, t))


def test_dist_single_row_has_intra_one_and_finite_gradients() -> None:
    s = _randn(1, 5, seed=11).requires_grad_()
    t = _randn(1, 5, seed=12)
    inter, intra = dist_parts(s, t, 2.0)
    assert intra.item() == pytest.approx(4.0)  # constant columns: correlation 0
    (inter + intra).backward()
    assert torch.isfinite(s.grad).all()


def test_dist_with_mask_equals_selected_rows_and_empty_mask_is_zero() -> None:
    s, t = _randn(2, 3, 4, seed=13), _randn(2, 3, 4, seed=14)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    t_nan = t.clone()
    t_nan[~mask] = float("nan")
    torch.testing.assert_close(dist_loss(s, t_nan, mask=mask), dist_loss(s[mask], t[mask]))
    torch.testing.assert_close(dist_loss(s, t), dist_loss(s.reshape(6, 4), t.reshape(6, 4)))
    s.requires_grad_()
    empty = dist_loss(s, t, mask=torch.zeros(2, 3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_dist_half_precision_gives_float32_and_module_equals_function() -> None:
    s, t = _randn(4, 6, seed=15), _randn(4, 6, seed=16)
    loss = dist_loss(s.half(), t.half())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, dist_loss(s.half().float(), t.half().float()))
    module = DISTLoss(beta=2.0, gamma=0.5, temperature=4.0)
    assert list(module.parameters()) == []
    assert not getattr(module, "requires_target", False)
    torch.testing.assert_close(module(s, t), dist_loss(s, t, 2.0, 0.5, 4.0))


def test_dist_rejects_bad_hyper_parameters_and_shapes() -> None:
    s, t = _randn(2, 3), _randn(2, 3, seed=1)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        dist_loss(s, t, beta=-1.0)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        DISTLoss(gamma=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        DISTLoss(temperature=-2.0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 3\)"):
        dist_loss(s, _randn(3, 3))


# =========================================================================== CRD


def _reference_nce(scores: list[list[float]], num_samples: int) -> float:
    """RepDistiller ContrastLoss, row by row."""
    eps = 1e-7
    total = 0.0
    for row in scores:
        m = len(row) - 1
        noise = m / num_samples
        total += math.log(row[0] / (row[0] + noise + eps))
        for x in row[1:]:
            total += math.log(noise / (x + noise + eps))
    return -total / len(scores)


def test_crd_nce_loss_matches_slow_reference() -> None:
    scores = torch.rand(4, 6, generator=_gen(0), dtype=F64) * 3 + 0.01
    expected = _reference_nce(scores.tolist(), 50)
    assert crd_nce_loss(scores, 50).item() == pytest.approx(expected, rel=1e-12)
    assert crd_nce_loss(scores.float(), 50).dtype == torch.float32
    assert crd_nce_loss(scores[:0], 50).item() == 0.0


def test_crd_nce_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, K \+ 1\)"):
        crd_nce_loss(torch.ones(4, 1), 10)
    with pytest.raises(ValueError, match=r"\(B, K \+ 1\)"):
        crd_nce_loss(torch.ones(4), 10)
    with pytest.raises(ValueError, match="num_samples"):
        crd_nce_loss(torch.ones(4, 3), 0)


B, N, K, FEAT, DS, DT = 4, 32, 8, 8, 6, 5


def _crd(seed: int = 0) -> CRDLoss:
    torch.manual_seed(seed)  # the heads use the global RNG, like nn.Linear
    return CRDLoss(DS, DT, N, feat_dim=FEAT, num_negatives=K, seed=seed)


def _crd_batch() -> tuple[Tensor, Tensor, Tensor]:
    s = torch.randn(B, DS, generator=_gen(1))
    t = torch.randn(B, DT, generator=_gen(2))
    return s, t, torch.tensor([3, 0, 17, 31])


def test_crd_forward_equals_reference_with_given_negatives_and_updates_memory() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    neg = torch.randint(0, N, (B, K), generator=_gen(3))
    mem_s, mem_t = m.memory_student.clone(), m.memory_teacher.clone()

    with torch.no_grad():  # reference from the formulas
        v_s = F.normalize(m.embed_student(s), dim=1)
        v_t = F.normalize(m.embed_teacher(t), dim=1)
        all_idx = torch.cat([index[:, None], neg], 1)
        out_s = torch.exp(torch.einsum("bkf,bf->bk", mem_t[all_idx], v_s) / 0.07)
        out_t = torch.exp(torch.einsum("bkf,bf->bk", mem_s[all_idx], v_t) / 0.07)
        z_s, z_t = out_s.mean().item() * N, out_t.mean().item() * N
        expected = _reference_nce((out_s / z_s).tolist(), N) + _reference_nce(
            (out_t / z_t).tolist(), N
        )

    loss = m(s, t, index=index, contrast_index=neg)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert m.z_student.item() == pytest.approx(z_s, rel=1e-5)
    assert m.z_teacher.item() == pytest.approx(z_t, rel=1e-5)

    others = torch.ones(N, dtype=torch.bool)
    others[index] = False
    assert torch.equal(m.memory_student[others], mem_s[others])
    assert torch.equal(m.memory_teacher[others], mem_t[others])
    torch.testing.assert_close(
        m.memory_student[index], F.normalize(0.5 * mem_s[index] + 0.5 * v_s, dim=1)
    )
    torch.testing.assert_close(
        m.memory_teacher[index], F.normalize(0.5 * mem_t[index] + 0.5 * v_t, dim=1)
    )


def test_crd_backward_reaches_both_heads_and_the_student_but_not_the_banks() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    s.requires_grad_()
    loss = m(s, t, index=index)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for p in m.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert not m.memory_student.requires_grad and not m.memory_teacher.requires_grad


def test_crd_normalisation_constants_are_estimated_once_then_fixed() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    assert m.z_student.item() < 0 and m.z_teacher.item() < 0
    m(s, t, index=index)
    z = (m.z_student.item(), m.z_teacher.item())
    assert z[0] > 0 and z[1] > 0
    m(s * 2, t - 1, index=torch.tensor([1, 2, 4, 5]))
    assert (m.z_student.item(), m.z_teacher.item()) == z


def test_crd_buffers_are_in_state_dict_and_round_trip() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    m(s, t, index=index)
    state = m.state_dict()
    for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert name in state
    assert state["memory_student"].shape == (N, FEAT)
    fresh = _crd(seed=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_teacher, m.memory_teacher)
    assert fresh.z_student.item() == m.z_student.item()


def test_crd_is_deterministic_given_the_seed() -> None:
    s, t, index = _crd_batch()
    a, b = _crd(seed=0), _crd(seed=0)
    losses_a = [a(s, t, index=index).item() for _ in range(2)]
    losses_b = [b(s, t, index=index).item() for _ in range(2)]
    assert losses_a == losses_b
    assert torch.equal(a.memory_student, b.memory_student)
    c = CRDLoss(DS, DT, N, feat_dim=FEAT, num_negatives=K, seed=1)
    c.load_state_dict(_crd(seed=0).state_dict())  # same heads and banks, other sampler seed
    assert c(s, t, index=index).item() != losses_a[0]


def test_crd_sampled_negatives_are_in_range_and_never_the_positive() -> None:
    m = CRDLoss(DS, DT, 3, feat_dim=FEAT, num_negatives=200)
    index = torch.tensor([0, 1, 2, 1])
    neg = m.sample_negatives(index)
    assert neg.shape == (4, 200)
    assert neg.min() >= 0 and neg.max() < 3
    assert not (neg == index[:, None]).any()
    for row, pos in zip(neg, index.tolist(), strict=True):  # both other samples drawn
        assert set(row.tolist()) == {0, 1, 2} - {pos}


def test_crd_eval_mode_does_not_update_the_memory() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    m.eval()
    before = m.memory_student.clone(), m.memory_teacher.clone()
    m(s, t, index=index)
    assert torch.equal(m.memory_student, before[0])
    assert torch.equal(m.memory_teacher, before[1])


def test_crd_rejects_bad_index_and_feature_shapes() -> None:
    m = _crd()
    s, t, index = _crd_batch()
    with pytest.raises(ValueError, match=r"index has shape \(4, 1\).*\(4,\)"):
        m(s, t, index=index[:, None])
    with pytest.raises(ValueError, match=r"index has shape \(3,\)"):
        m(s, t, index=index[:3])
    with pytest.raises(ValueError, match=r"index holds values in \[0, 32\].*num_samples=32"):
        m(s, t, index=torch.tensor([0, 1, 2, 32]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        m(s, t, index=torch.tensor([0, 1, 2, -1]))
    with pytest.raises(TypeError, match="integer dataset indices"):
        m(s, t, index=index.float())
    with pytest.raises(ValueError, match="contrast_index has shape"):
        m(s, t, index=index, contrast_index=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="student_dim=6"):
        m(torch.randn(B, 7), t, index=index)
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(s, t[:3], index=index)
    assert torch.equal(m.z_student, torch.tensor(-1.0))  # nothing was touched


def test_crd_rejects_bad_hyper_parameters_and_declares_it_needs_indices() -> None:
    assert CRDLoss.requires_index is True
    with pytest.raises(ValueError, match="num_samples"):
        CRDLoss(DS, DT, 1)
    with pytest.raises(ValueError, match="num_negatives"):
        CRDLoss(DS, DT, N, num_negatives=0)
    with pytest.raises(ValueError, match="nce_t"):
        CRDLoss(DS, DT, N, nce_t=0.0)
    with pytest.raises(ValueError, match="momentum"):
        CRDLoss(DS, DT, N, momentum=1.0)
