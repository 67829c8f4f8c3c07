"""Specification tests for Hinton KD (`kd_loss`, `KDLoss`) and `hinton_loss` / `HintonLoss`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.losses import HintonLoss, KDLoss, cross_entropy, hinton_loss, kd_loss

NEG_INF = float("-inf")


def _reference_kd(
    student: list[list[float]], teacher: list[list[float]], temperature: float
) -> float:
    """Textbook T² · mean_rows Σ_c p_t (log p_t − log p_s), loops and `math` only.

    Classes with teacher probability 0 (teacher logit -inf) are skipped (0·log 0 = 0).
    """

    def softmax(row: list[float]) -> list[float]:
        scaled = [v / temperature for v in row]
        top = max(scaled)
        exps = [math.exp(v - top) for v in scaled]
        total = sum(exps)
        return [e / total for e in exps]

    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = softmax(s_row), softmax(t_row)
        for ps, pt in zip(p_s, p_t, strict=True):
            if pt > 0:
                total += pt * (math.log(pt) - math.log(ps))
    return temperature**2 * total / len(student)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_textbook_reference(temperature: float) -> None:
    g = _gen()
    s = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    expected = _reference_kd(s.tolist(), t.tolist(), temperature)
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_kd_loss_is_zero_for_identical_logits() -> None:
    z = torch.randn(4, 6, generator=_gen())
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_unchanged_by_per_row_constant_shift_of_either_logits() -> None:
    g = _gen()
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    shift = torch.randn(4, 1, generator=g, dtype=torch.float64) * 10
    base = kd_loss(s, t, 2.0)
    torch.testing.assert_close(kd_loss(s + shift, t, 2.0), base)
    torch.testing.assert_close(kd_loss(s, t - shift, 2.0), base)


def test_kd_loss_on_batch_time_classes_equals_flattened_rows() -> None:
    g = _gen()
    s = torch.randn(2, 3, 5, generator=g)
    t = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(kd_loss(s, t), kd_loss(s.reshape(6, 5), t.reshape(6, 5)))


def test_kd_loss_on_a_single_unbatched_row_of_shape_c() -> None:
    g = _gen()
    s, t = torch.randn(5, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(kd_loss(s, t), kd_loss(s[None], t[None]))


# --------------------------------------------------------------------------- gradients


def test_kd_loss_passes_gradcheck_for_student_and_teacher_in_float64() -> None:
    g = _gen()
    s = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 2.0), (s, t))


def test_kd_loss_passes_gradcheck_with_a_mask() -> None:
    g = _gen()
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, 3.0, mask=mask), (s, t))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_student_gradient_is_t_times_ps_minus_pt_over_n(temperature: float) -> None:
    g = _gen()
    s = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    kd_loss(s, t, temperature).backward()
    p_s = torch.softmax(s.detach() / temperature, -1)
    p_t = torch.softmax(t / temperature, -1)
    torch.testing.assert_close(s.grad, temperature * (p_s - p_t) / 5)


def test_kd_loss_student_gradient_formula_counts_only_true_rows() -> None:
    g = _gen()
    s = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, False])
    kd_loss(s, t, 2.0, mask=mask).backward()
    expected = 2.0 * (torch.softmax(s.detach() / 2, -1) - torch.softmax(t / 2, -1)) / 3
    expected[~mask] = 0
    torch.testing.assert_close(s.grad, expected)


# --------------------------------------------------------------------------- masks


def test_kd_loss_with_mask_equals_kd_loss_on_selected_rows() -> None:
    g = _gen()
    s = torch.randn(2, 4, 5, generator=g)
    t = torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    torch.testing.assert_close(kd_loss(s, t, mask=mask), kd_loss(s[mask], t[mask]))


def test_kd_loss_ignores_values_of_masked_out_rows_even_nan() -> None:
    g = _gen()
    s = torch.randn(4, 5, generator=g)
    t = torch.randn(4, 5, generator=g)
    mask = torch.tensor([True, False, True, False])
    base = kd_loss(s, t, mask=mask)
    s2, t2 = s.clone(), t.clone()
    s2[1] = 1e6
    t2[3] = float("nan")
    t2[1] = NEG_INF
    assert torch.equal(kd_loss(s2, t2, mask=mask), base)


def test_kd_loss_fully_masked_is_exactly_zero_with_finite_zero_gradient() -> None:
    s = torch.randn(3, 4, generator=_gen(), requires_grad=True)
    t = torch.randn(3, 4, generator=_gen(1), requires_grad=True)
    loss = kd_loss(s, t, mask=torch.zeros(3, dtype=torch.bool))
    assert loss.dim() == 0
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.equal(t.grad, torch.zeros_like(t))


def test_kd_loss_accepts_integer_zero_one_mask_like_attention_mask() -> None:
    g = _gen()
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(kd_loss(s, t, mask=mask), kd_loss(s, t, mask=mask.bool()))


# --------------------------------------------------------------------------- -inf teacher


def test_kd_loss_with_minus_inf_teacher_logits_is_finite_with_finite_grads() -> None:
    g = _gen()
    s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t[0, 1] = NEG_INF
    t[2, [0, 4]] = NEG_INF
    expected = _reference_kd(s.tolist(), t.tolist(), 2.0)
    s.requires_grad_()
    t.requires_grad_()
    loss = kd_loss(s, t, 2.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(t.grad).all()
    p_s = torch.softmax(s.detach() / 2, -1)
    p_t = torch.softmax(t.detach() / 2, -1)
    torch.testing.assert_close(s.grad, 2.0 * (p_s - p_t) / 3)


def test_kd_loss_with_minus_inf_in_both_at_same_classes_equals_loss_on_other_classes() -> None:
    g = _gen()
    s = torch.randn(2, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, generator=g, dtype=torch.float64)
    keep = [0, 2, 3]
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, [1, 4]] = NEG_INF
    t_inf[:, [1, 4]] = NEG_INF
    s_inf.requires_grad_()
    t_inf.requires_grad_()
    loss = kd_loss(s_inf, t_inf, 3.0)
    loss.backward()
    torch.testing.assert_close(loss, kd_loss(s[:, keep], t[:, keep], 3.0))
    assert torch.isfinite(s_inf.grad).all()
    assert torch.isfinite(t_inf.grad).all()


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_loss_half_precision_inputs_give_float32_close_to_float32(dtype: torch.dtype) -> None:
    g = _gen()
    s = torch.randn(4, 8, generator=g).to(dtype)
    t = torch.randn(4, 8, generator=g).to(dtype)
    loss = kd_loss(s, t)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, kd_loss(s.float(), t.float()))


def test_kd_loss_half_precision_with_large_logits_stays_finite() -> None:
    s = torch.tensor([[60000.0, -60000.0, 0.0]], dtype=torch.float16, requires_grad=True)
    t = torch.tensor([[-60000.0, 60000.0, 0.0]], dtype=torch.float16)
    loss = kd_loss(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- validation


def test_kd_loss_rejects_different_class_counts_naming_both() -> None:
    with pytest.raises(
        ValueError, match=r"student has 10 classes, teacher has 12.*map the teacher"
    ):
        kd_loss(torch.randn(2, 10), torch.randn(2, 12))


def test_kd_loss_rejects_different_leading_shapes_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(5, 10\)"):
        kd_loss(torch.randn(4, 10), torch.randn(5, 10))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_kd_loss_rejects_non_positive_or_non_finite_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature)


def test_kd_loss_rejects_mask_with_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\).*leading shape \(2, 3\)"):
        kd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), mask=torch.ones(2, 4, dtype=torch.bool))


def test_kd_loss_rejects_float_mask() -> None:
    with pytest.raises(TypeError, match="mask must be a boolean"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.ones(2))


# --------------------------------------------------------------------------- module


def test_kd_loss_module_equals_function() -> None:
    g = _gen()
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    module = KDLoss(temperature=2.5)
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(s, t, mask), kd_loss(s, t, 2.5, mask))


# --------------------------------------------------------------------------- hinton_loss


def _hinton_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen()
    s = torch.randn(2, 3, 5, generator=g)
    t = torch.randn(2, 3, 5, generator=g)
    y = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    return s, t, y, mask


def test_hinton_loss_with_alpha_zero_is_plain_cross_entropy() -> None:
    s, t, y, mask = _hinton_inputs()
    torch.testing.assert_close(
        hinton_loss(s, t, y, alpha=0.0), F.cross_entropy(s.reshape(6, 5), y.reshape(6))
    )
    torch.testing.assert_close(
        hinton_loss(s, t, y, alpha=0.0, mask=mask), cross_entropy(s, y, mask)
    )


def test_hinton_loss_with_alpha_one_is_kd_loss() -> None:
    s, t, y, mask = _hinton_inputs()
    torch.testing.assert_close(
        hinton_loss(s, t, y, 3.0, alpha=1.0, mask=mask), kd_loss(s, t, 3.0, mask)
    )


def test_hinton_loss_in_between_is_convex_combination() -> None:
    s, t, y, mask = _hinton_inputs()
    soft, hard = kd_loss(s, t, 2.0, mask), cross_entropy(s, y, mask)
    torch.testing.assert_close(
        hinton_loss(s, t, y, temperature=2.0, alpha=0.3, mask=mask), 0.3 * soft + 0.7 * hard
    )


def test_hinton_loss_ignores_targets_of_masked_out_rows() -> None:
    s, t, y, mask = _hinton_inputs()
    y2 = y.clone()
    y2[~mask] = -100
    torch.testing.assert_close(hinton_loss(s, t, y2, mask=mask), hinton_loss(s, t, y, mask=mask))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_hinton_loss_rejects_alpha_outside_zero_one(alpha: float) -> None:
    s, t, y, _ = _hinton_inputs()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        hinton_loss(s, t, y, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        HintonLoss(alpha=alpha)


def test_hinton_loss_rejects_target_with_wrong_shape() -> None:
    s, t, _, _ = _hinton_inputs()
    with pytest.raises(ValueError, match=r"target has shape \(6,\)"):
        hinton_loss(s, t, torch.zeros(6, dtype=torch.long))


def test_hinton_loss_module_equals_function() -> None:
    s, t, y, mask = _hinton_inputs()
    module = HintonLoss(temperature=3.0, alpha=0.6)
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(s, t, y, mask), hinton_loss(s, t, y, 3.0, 0.6, mask))


# --------------------------------------------------------------------------- property


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(min_value=0, max_value=4),
    classes=st.integers(min_value=1, max_value=6),
    temperature=st.floats(min_value=0.1, max_value=10.0),
    scale=st.floats(min_value=0.0, max_value=50.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_kd_loss_is_finite_and_non_negative_for_random_inputs(
    rows: int, classes: int, temperature: float, scale: float, seed: int
) -> None:
    g = _gen(seed)
    s = torch.randn(rows, classes, generator=g) * scale
    t = torch.randn(rows, classes, generator=g) * scale
    loss = kd_loss(s, t, temperature)
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-4 * max(1.0, temperature**2)
