"""DIST: distillation by matching Pearson correlations of the predictions.

Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger
Teacher" (NeurIPS). Exact matching with KL is too strict when the teacher is
much stronger; DIST only asks the student to preserve the *relations* of the
teacher's predictions, measured by the Pearson correlation ``ρ``. With
``Y = softmax(Z / T)`` ``(B, C)`` for student and teacher::

    inter = 1 − mean_i ρ(Y^S_i,: , Y^T_i,:)      per row, along the classes
    intra = 1 − mean_c ρ(Y^S_:,c , Y^T_:,c)      per class, along the batch
    dist  = T² · (beta · inter + gamma · intra)

with ``ρ`` the Pearson correlation; the authors' code also multiplies by
``tau²``. Defaults are the paper's ``beta = gamma = 1`` and ``T = 1``.

Numerics (where this differs from the authors' code, which divides by
``‖a_c‖ · ‖b_c‖ + 1e-8``, ``a_c = a − ā``): the regulariser is relative, inside the
square roots::

    ρ(a, b) = ⟨a_c, b_c⟩ / sqrt((‖a_c‖² + eps ‖b_c‖² + tiny) · (‖b_c‖² + eps ‖a_c‖² + tiny))

with ``eps = 1e-8`` and ``tiny = 1e-20``. Pearson's ρ is scale-invariant and so is
this one (up to ``tiny``), so it is the exact correlation up to a relative
``eps · ‖b_c‖² / ‖a_c‖²`` at every temperature — the authors' absolute ``eps``
changes ρ by ~1 % at ``T = 1e3``, where softened probabilities differ by ~1e-4.
And at a constant student row (a zero-initialised classifier; saturated logits)
the gradient is bounded by ``1 / (sqrt(eps) ‖b_c‖)`` (~1e4) instead of
``‖b_c‖ / 1e-8`` (~1e7), which overflowed float16 (tests/reliability).

The ``T²`` factor is part of the method, and because ρ does not shrink with
``T`` (unlike KL, whose ``1 / T²`` gradient it was meant to offset) DIST's
gradient grows like ``T²``: ≈ 2e5 at ``T = 1e3`` for unit-scale logits, beyond
float16's largest number (65504). Keep ``T`` ≤ 100 with float16 logits (the
paper uses 1–4); float32/bfloat16 are fine at any ``T``.

Because the correlations are shift- and scale-invariant, only the relations
matter: identical logits give 0 (up to ``eps``), and adding a constant to a row
of logits changes nothing. A constant vector (e.g. a batch with a single row,
along which every class is constant) has correlation 0 with everything — so a
single-row batch has ``intra = 1`` with zero gradient.

Shapes follow the package convention (see ``_reduce``): logits ``(..., C)``
with all leading dims flattened into rows — the intra-class correlation is
taken over *all* counted rows — and an optional boolean ``mask`` ``(...)``
selecting the rows that count; no counted row gives exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.losses._reduce import _check_mask, _compute_dtype, _flatten_rows
from kdistill.losses.kd import _check_pair, _check_temperature

__all__ = ["DISTLoss", "dist_loss", "dist_parts"]

_PEARSON_EPS = 1e-8  # relative: the other vector's squared norm times this
_PEARSON_TINY = 1e-20  # absolute floor: constant vectors give 0, not 0 / 0 (and tiny^-1.5
# stays finite in float32, so the gradient there is 0, not 0 * inf)


def _check_weight(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(
            f"{name} must be a finite number >= 0 (the weight of its DIST part), got {value!r}"
        )


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``, with a relative ``eps``.

    The ``eps`` inside the square roots scales with the other vector's variance,
    so the result stays scale-invariant, and bounds the gradient at a constant
    slice (correlation 0 there). See the module docstring.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    ss_a = (a * a).sum(dim=dim)
    ss_b = (b * b).sum(dim=dim)
    inv_a = torch.rsqrt(ss_a + _PEARSON_EPS * ss_b + _PEARSON_TINY)
    inv_b = torch.rsqrt(ss_b + _PEARSON_EPS * ss_a + _PEARSON_TINY)
    return (a * b).sum(dim=dim) * inv_a * inv_b


def dist_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two DIST parts ``(T² · inter, T² · intra)`` (Huang et al. 2022).

    Args:
        student_logits: ``(..., C)``.
        teacher_logits: ``(..., C)``, same shape. Detach it yourself if the
            teacher should not receive gradients.
        temperature: ``T > 0``; both softmaxes are softened by it and each
            part is multiplied by ``T²``.
        mask: optional ``(...)`` bool; only True rows count (for both the
            per-row and the along-the-batch correlations).

    Returns:
        ``(inter, intra)``: two 0-dim tensors, at least float32; both exactly
        0 when no row counts.

    Raises:
        ValueError: mismatched shapes, ``temperature <= 0`` or a badly shaped
            mask.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    flat_mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = _flatten_rows(student_logits, flat_mask).to(dtype)  # (M, C)
    t = _flatten_rows(teacher_logits, flat_mask).to(dtype)  # (M, C)
    scale = temperature * temperature
    if s.shape[0] == 0:  # no counted row: exactly 0, still in the graph
        zero = s.sum() * 0.0 + t.sum() * 0.0
        return zero, zero.clone()

    y_s = torch.softmax(s / temperature, dim=-1)  # (M, C)
    y_t = torch.softmax(t / temperature, dim=-1)  # (M, C)
    inter = 1.0 - _pearson(y_s, y_t, dim=1).mean()  # rows, along the classes
    intra = 1.0 - _pearson(y_s, y_t, dim=0).mean()  # classes, along the batch
    return inter * scale, intra * scale


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """DIST loss ``T² · (beta · inter + gamma · intra)`` (Huang et al. 2022).

    See :func:`dist_parts` for the arguments and the module docstring for the
    formulas. ``beta`` weighs the inter-class (per-row) relation and ``gamma``
    the intra-class (along-the-batch) relation; both finite and ``>= 0``.

    Returns:
        0-dim tensor, at least float32.
    """
    _check_weight("beta", beta)
    _check_weight("gamma", gamma)
    inter, intra = dist_parts(student_logits, teacher_logits, temperature, mask)
    return beta * inter + gamma * intra


class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss`; holds only ``beta``, ``gamma`` and ``temperature``."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        _check_weight("beta", beta)
        _check_weight("gamma", gamma)
        _check_temperature(temperature)
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        return dist_loss(
            student_logits, teacher_logits, self.beta, self.gamma, self.temperature, mask
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
