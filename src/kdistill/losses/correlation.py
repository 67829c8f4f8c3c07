"""Correlation Congruence (CC) with the Taylor-expanded Gaussian RBF kernel.

Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang 2019, "Correlation Congruence for
Knowledge Distillation" (ICCV). Besides instance congruence (plain KD), the
student matches the *correlation matrix* ``ψ(F)`` ``(B, B)`` of the batch
embeddings, built with a kernel ``k``::

    ψ(F)_ij = k(f_i, f_j),        L_CC = ‖ψ(F_t) − ψ(F_s)‖²_F / B²

The paper's best kernel is the Gaussian RBF ``k(a, b) = exp(−γ‖a − b‖²)``,
approximated by its order-``P`` Taylor expansion (paper Sec. 3.3)::

    k(f_i, f_j) ≈ Σ_{p=0}^{P} exp(−2γ) · (2γ)^p / p! · ⟨f_i, f_j⟩^p

with ``γ = 0.4`` and ``P = 2`` as defaults. The expansion uses
``‖a − b‖² = 2 − 2⟨a, b⟩``, which holds for unit vectors, so the embeddings are
L2-normalised first (``f_i = e_i / ‖e_i‖``); as ``P → ∞`` the kernel tends to the
exact RBF kernel of the normalised embeddings. (RepDistiller's ``Correlation``
implements a simpler ``(e_s − e_t)`` correlation from the authors' email, not
this kernel form.)

The embeddings must have the same size ``(B, D)``: in the paper both networks
end in an embedding layer of equal width — give the student an adapter (e.g.
``nn.Linear(D_s, D_t)``) otherwise. Inputs ``(B, ...)`` are flattened to
``(B, D)``. A zero embedding has no direction and is treated as orthogonal to
every other (with a zero gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.losses.cosine import _safe_normalize
from kdistill.losses.similarity import _batch_rows

__all__ = ["CorrelationCongruenceLoss", "correlation_congruence_loss"]


def _check_params(gamma: float, order: int) -> None:
    if not (gamma > 0 and math.isfinite(gamma)):  # also rejects NaN
        raise ValueError(f"gamma must be a finite number > 0 (0.4 in the paper), got {gamma!r}")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(
            f"order must be an integer >= 1 (the Taylor order P; 2 in the paper), got {order!r}"
        )


def _taylor_rbf_kernel(x: Tensor, gamma: float, order: int) -> Tensor:
    """Order-``P`` Taylor RBF correlation matrix of L2-normalised rows ``(B, D) -> (B, B)``."""
    unit = _safe_normalize(x, dim=1)  # (B, D)
    cos = unit @ unit.T  # (B, B), in [-1, 1]
    base = math.exp(-2.0 * gamma)
    kernel = torch.full_like(cos, base)  # p = 0 term
    power = torch.ones_like(cos)
    for p in range(1, order + 1):
        power = power * cos  # cos^p
        kernel = kernel + (base * (2.0 * gamma) ** p / math.factorial(p)) * power
    return kernel


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() >= 1 and teacher.dim() >= 1 and s[0] == t[0] and s != t:
        raise ValueError(
            f"student embeddings {s} vs teacher {t}: correlation congruence compares "
            "embeddings of the same size; add an adapter (e.g. an nn.Linear) that maps the "
            "student embedding onto the teacher's size"
        )


def correlation_congruence_loss(
    student: Tensor, teacher: Tensor, gamma: float = 0.4, order: int = 2
) -> Tensor:
    """CC loss ``‖ψ(F_t) − ψ(F_s)‖²_F / B²`` with the Taylor RBF kernel (Peng et al. 2019).

    Args:
        student: ``(B, D)`` student embeddings (after an adapter if needed);
            ``(B, ...)`` is flattened.
        teacher: ``(B, D)`` teacher embeddings, same shape. Detach it yourself
            if the teacher should not receive gradients.
        gamma: RBF width ``γ > 0``; 0.4 in the paper.
        order: Taylor order ``P >= 1``; 2 in the paper.

    Returns:
        0-dim tensor, at least float32; exactly 0 for an empty batch.

    Raises:
        ValueError: different shapes (the message says to add an adapter),
            ``gamma <= 0`` or ``order < 1``.
    """
    _check_params(gamma, order)
    _check_pair(student, teacher)
    s, t = _batch_rows(student, teacher, "correlation_congruence_loss")
    b = s.shape[0]
    diff = _taylor_rbf_kernel(s, gamma, order) - _taylor_rbf_kernel(t, gamma, order)  # (B, B)
    return diff.pow(2).sum() / max(b * b, 1)


class CorrelationCongruenceLoss(nn.Module):
    """Module form of :func:`correlation_congruence_loss`; holds only ``gamma`` and ``order``."""

    same_shape = True  # compares tensors elementwise: adapters apply when shapes differ

    def __init__(self, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        _check_params(gamma, order)
        self.gamma = gamma
        self.order = order

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return correlation_congruence_loss(student, teacher, self.gamma, self.order)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"
