"""DIST: distillation by matching Pearson correlations of the predictions.

Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger
Teacher" (NeurIPS). Exact matching with KL is too strict when the teacher is
much stronger; DIST only asks the student to preserve the *relations* of the
teacher's predictions, measured by the Pearson correlation ``ρ``. With
``Y = softmax(Z / T)`` ``(B, C)`` for student and teacher::

    inter = 1 − mean_i ρ(Y^S_i,: , Y^T_i,:)      per row, along the classes
    intra = 1 − mean_c ρ(Y^S_:,c , Y^T_:,c)      per class, along the batch
    dist  = T² · (beta · inter + gamma · intra)

with ``ρ(a, b) = ⟨a − ā, b − b̄⟩ / (‖a − ā‖ · ‖b − b̄‖ + eps)`` and ``eps = 1e-8``,
exactly as the authors' code (which also multiplies by ``tau²``). Defaults are
the paper's ``beta = gamma = 1`` and ``T = 1``.

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

_PEARSON_EPS = 1e-8


def _check_weight(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(
            f"{name} must be a finite number >= 0 (the weight of its DIST part), got {value!r}"
        )


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (``eps`` in the denominator).

    ``vector_norm`` has a zero (not ``NaN``) gradient at a zero vector, so
    constant slices give correlation 0 with finite gradients.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    return (a * b).sum(dim=dim) / (norms + _PEARSON_EPS)


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
