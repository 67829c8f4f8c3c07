"""Edge-case fuzzing of every logit distillation loss: masks, -inf, huge values, dtypes, T.

Covered: the registry losses whose inputs are logits (``kd``, ``dkd``, ``dist``,
``cross_entropy``, ``label_smoothing``) and the functions ``kd_loss`` / ``hinton_loss``.
Properties (hypothesis over shapes, dtypes, values and temperatures):

- a fully masked batch gives exactly 0 with finite (zero) gradients, whatever the masked
  rows hold (even NaN / inf);
- teacher logits of ``-inf`` at some classes (padding; at least one finite class per row)
  give a finite loss and finite student and teacher gradients;
- huge finite student and teacher logits (up to ±1e4, i.e. ±1e7 after T = 1e-3) give a
  finite loss and gradients;
- float16 / bfloat16 inputs give a finite float32 loss and finite gradients in the input
  dtype;
- temperatures from 1e-3 to 1e3 give a finite loss and gradients.

One range limit, proved rather than skipped: DIST is scaled by ``T²`` and, since Pearson's
correlation does not shrink with ``T``, its true gradient grows like ``T²`` (≈ 2.6e5 at
``T = 1e3`` for unit logits) — beyond float16's largest number, 65504, so no implementation
can return it in float16 (``test_dist_float16_gradient_at_temperature_1e3_exceeds_float16``).
The fuzz tests run DIST in float16 up to ``T = 100`` (its documented float16 range) and in
float32/float64/bfloat16 at every temperature. A constant student row (a zero-initialised
classifier) has a bounded, float16-finite gradient
(``test_dist_gradient_at_a_constant_student_row_is_finite_and_bounded``).

Not covered, by design: ``+inf`` / ``NaN`` *student* logits (in counted rows) cannot give a
finite KL or cross-entropy in general (``softmax([inf, 0]) = [1, 0]`` makes ``log p_s = -inf``
wherever the teacher has mass); the losses return NaN and the Trainer's non-finite guard
stops (or skips) that step (tests/reliability/test_nonfinite.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from kdistill.losses import hinton_loss, kd_loss
from kdistill.losses.registry import LOSSES


@dataclass(frozen=True)
class Case:
    """How to call one loss: ``call(student, teacher, target, mask, temperature)``."""

    name: str
    call: Callable[[Tensor, Tensor, Tensor, Tensor | None, float], Tensor]
    uses_teacher: bool = True
    has_temperature: bool = True
    float16_max_temperature: float = math.inf  # DIST: its gradient grows like T², see below


def _module(name: str, **fixed: float) -> Callable[[float], torch.nn.Module]:
    def build(temperature: float) -> torch.nn.Module:
        kwargs = dict(fixed)
        if name in ("kd", "dkd", "dist"):
            kwargs["temperature"] = temperature
        return LOSSES.get(name)(**kwargs)

    return build


CASES = [
    Case("kd", lambda s, t, y, m, tau: _module("kd")(tau)(s, t, mask=m)),
    Case("dkd", lambda s, t, y, m, tau: _module("dkd")(tau)(s, t, y, mask=m)),
    Case(
        "dist",
        lambda s, t, y, m, tau: _module("dist")(tau)(s, t, mask=m),
        float16_max_temperature=100.0,
    ),
    Case(
        "cross_entropy",
        lambda s, t, y, m, tau: _module("cross_entropy")(tau)(s, y, mask=m),
        uses_teacher=False,
        has_temperature=False,
    ),
    Case(
        "label_smoothing",
        lambda s, t, y, m, tau: _module("label_smoothing", smoothing=0.1)(tau)(s, y, mask=m),
        uses_teacher=False,
        has_temperature=False,
    ),
    Case("kd_loss", lambda s, t, y, m, tau: kd_loss(s, t, temperature=tau, mask=m)),
    Case(
        "hinton_loss",
        lambda s, t, y, m, tau: hinton_loss(s, t, y, temperature=tau, alpha=0.7, mask=m),
    ),
]
IDS = [case.name for case in CASES]
LOGIT_LOSSES = {"kd", "dkd", "dist", "cross_entropy", "label_smoothing"}

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@dataclass
class Inputs:
    student: Tensor
    teacher: Tensor
    target: Tensor
    temperature: float


SCALES = st.sampled_from([1e-3, 1.0, 10.0, 1e3, 1e4])
TEMPERATURES = st.sampled_from([1e-3, 0.1, 1.0, 4.0, 1e3])


@st.composite
def inputs(
    draw: st.DrawFn,
    scale: st.SearchStrategy[float] = SCALES,
    dtypes: list[torch.dtype] = DTYPES,
    temperatures: st.SearchStrategy[float] = TEMPERATURES,
) -> Inputs:
    leading = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    classes = draw(st.integers(2, 6))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = (*leading, classes)
    s_scale, t_scale = draw(scale), draw(scale)
    student = (torch.randn(shape, generator=g, dtype=torch.float64) * s_scale).clamp(-1e4, 1e4)
    teacher = (torch.randn(shape, generator=g, dtype=torch.float64) * t_scale).clamp(-1e4, 1e4)
    if draw(st.booleans()):  # some saturated entries at exactly ±1e4
        extreme = torch.rand(shape, generator=g) < 0.3
        signs = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        student = torch.where(extreme, 1e4 * signs, student)
    target = torch.randint(0, classes, tuple(leading), generator=g)
    return Inputs(student.to(dtype), teacher.to(dtype), target, draw(temperatures))


def _evaluate(
    case: Case, x: Inputs, mask: Tensor | None = None, teacher_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    if x.student.dtype == torch.float16 and x.temperature > case.float16_max_temperature:
        assume(False)  # outside float16's range, proved by a test below
    student = x.student.clone().requires_grad_(True)
    teacher = x.teacher.clone().requires_grad_(teacher_grad and case.uses_teacher)
    loss = case.call(student, teacher, x.target, mask, x.temperature)
    loss.backward()
    return loss, student.grad, teacher.grad  # type: ignore[return-value]


def _assert_finite(loss: Tensor, *grads: Tensor | None) -> None:
    assert loss.dim() == 0 and torch.isfinite(loss), f"loss {loss}"
    assert loss.dtype in (torch.float32, torch.float64), loss.dtype
    for grad in grads:
        if grad is not None:
            assert torch.isfinite(grad).all(), f"non-finite gradient {grad}"


def test_the_cases_cover_every_logit_loss_in_the_registry() -> None:
    assert set(LOSSES.names()) >= LOGIT_LOSSES
    assert set(IDS) >= LOGIT_LOSSES


# -- fully masked batches ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@FUZZ
@given(x=inputs(), poison=st.sampled_from([0.0, math.nan, math.inf, -math.inf]))
def test_fully_masked_batch_gives_exactly_zero_and_finite_zero_gradients(
    case: Case, x: Inputs, poison: float
) -> None:
    mask = torch.zeros(x.target.shape, dtype=torch.bool)
    if poison:  # masked rows may hold anything: padding, NaN, inf
        x.student = torch.full_like(x.student, poison)
        x.teacher = torch.full_like(x.teacher, poison)
    loss, s_grad, t_grad = _evaluate(case, x, mask)
    assert loss.item() == 0.0
    _assert_finite(loss, s_grad, t_grad)
    assert not s_grad.any()


# -- -inf teacher logits (padding classes) ------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.uses_teacher], ids=lambda c: c.name)
@FUZZ
@given(x=inputs(), data=st.data())
def test_minus_inf_teacher_logits_at_some_classes_give_finite_loss_and_gradients(
    case: Case, x: Inputs, data: st.DataObject
) -> None:
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    padding = torch.rand(x.teacher.shape, generator=g) < 0.4
    keep = torch.randint(0, x.teacher.shape[-1], x.target.shape, generator=g)
    padding.scatter_(-1, keep[..., None], False)  # at least one finite class per row
    x.teacher = x.teacher.masked_fill(padding, -math.inf)
    loss, s_grad, t_grad = _evaluate(case, x)
    _assert_finite(loss, s_grad, t_grad)


@pytest.mark.parametrize("case", [c for c in CASES if c.uses_teacher], ids=lambda c: c.name)
def test_minus_inf_teacher_logits_with_a_mask_selecting_padded_rows_out(case: Case) -> None:
    """Sequence-style padding: whole padded positions are masked, others have -inf classes."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    teacher[..., 5:] = -math.inf  # vocabulary padding
    teacher[1, 3:] = -math.inf  # padded positions: every class -inf ...
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # ... and masked out
    target = torch.randint(0, 5, (2, 5), generator=g)
    loss, s_grad, t_grad = _evaluate(case, Inputs(student, teacher, target, 2.0), mask)
    _assert_finite(loss, s_grad, t_grad)
    assert not s_grad[1, 3:].any()


# -- huge logits, dtypes, temperatures ---------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@FUZZ
@given(x=inputs(scale=st.sampled_from([1e3, 1e4])))
def test_huge_finite_logits_give_finite_loss_and_gradients(case: Case, x: Inputs) -> None:
    loss, s_grad, t_grad = _evaluate(case, x)
    _assert_finite(loss, s_grad, t_grad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@FUZZ
@given(x=inputs(dtypes=[torch.float16, torch.bfloat16]))
def test_half_precision_inputs_give_a_finite_float32_loss(case: Case, x: Inputs) -> None:
    loss, s_grad, t_grad = _evaluate(case, x)
    _assert_finite(loss, s_grad, t_grad)
    assert loss.dtype == torch.float32
    assert s_grad.dtype == x.student.dtype


@pytest.mark.parametrize("case", [c for c in CASES if c.has_temperature], ids=lambda c: c.name)
@FUZZ
@given(
    x=inputs(
        temperatures=st.one_of(
            st.floats(1e-3, 1e-2), st.floats(1e2, 1e3), st.sampled_from([1e-3, 1e3])
        )
    )
)
def test_extreme_temperatures_give_finite_loss_and_gradients(case: Case, x: Inputs) -> None:
    loss, s_grad, t_grad = _evaluate(case, x)
    _assert_finite(loss, s_grad, t_grad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plus_inf_student_logits_are_not_finite_and_the_trainer_must_guard(case: Case) -> None:
    """Documented limitation: +inf student logits make the loss non-finite (never silently 0)."""
    student = torch.tensor([[math.inf, 0.0, 1.0], [0.5, 0.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    loss, _, _ = _evaluate(case, Inputs(student, teacher, torch.tensor([1, 2]), 2.0))
    assert not torch.isfinite(loss)


def test_dist_float16_gradient_at_temperature_1e3_exceeds_float16() -> None:
    """The exact float64 gradient is > 65504, so float16 cannot hold it: a range limit."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=g).half().double().requires_grad_(True)
    teacher = torch.randn(4, 5, generator=g).half().double()
    LOSSES.get("dist")(temperature=1e3)(student, teacher).backward()
    assert student.grad.abs().max() > torch.finfo(torch.float16).max
    student_100 = student.detach().requires_grad_(True)
    LOSSES.get("dist")(temperature=100.0)(student_100.half(), teacher.half()).backward()
    assert torch.isfinite(student_100.grad).all()  # within the documented float16 range


def test_dist_gradient_at_a_constant_student_row_is_finite_and_bounded() -> None:
    student = torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, -1.0]], dtype=torch.float16)
    teacher = torch.tensor([[-1.0352, 1.3701, -1.1553], [0.4263, -0.8262, 0.3691]])
    case = next(c for c in CASES if c.name == "dist")
    x = Inputs(student, teacher.half(), torch.zeros(2, dtype=torch.long), 1.0)
    loss, s_grad, t_grad = _evaluate(case, x)
    _assert_finite(loss, s_grad, t_grad)
    # ~2e3: bounded by 1 / (sqrt(eps) · ‖b_c‖) through the softmax, not ‖b_c‖ / eps ≈ 1e7
    assert s_grad.abs().max() < 1e4
