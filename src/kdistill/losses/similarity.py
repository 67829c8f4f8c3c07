"""Similarity-Preserving knowledge distillation (SP).

Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV). For
features ``F`` ``(B, ...)`` flattened to ``Q`` ``(B, D)``, the batch similarity
matrix is the Gram matrix with each row L2-normalised::

    G = row_normalize(Q · Qᵀ)                  (B, B)
    loss = ‖G_s − G_t‖²_F / B²

as in the paper (eq. 2–4) and RepDistiller's ``Similarity``. Only the B×B
similarities are compared, so student and teacher feature sizes may differ
(e.g. ``(B, 32, 8, 8)`` vs ``(B, 64, 4, 4)``). The loss is invariant to a
positive scaling of either input and to permuting the batch (the same
permutation applied to both).

A sample whose features are all zero has a zero row in ``G``; it is left at 0
with a zero gradient (no ``NaN``, no ``1/eps`` blow-up).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from kdistill.losses._reduce import _compute_dtype
from kdistill.losses.cosine import _safe_normalize

__all__ = ["SimilarityPreservingLoss", "similarity_preserving_loss"]


def _batch_rows(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Check equal batch sizes and flatten ``(B, ...)`` to ``(B, D)`` in the compute dtype.

    Shared by the relational losses (SP, RKD, PKT, CC), which compare B×B
    relations and so accept different feature sizes for student and teacher.
    """
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(f"{what} expects batched features (B, ...); got student {s}, teacher {t}")
    if s[0] != t[0]:
        raise ValueError(
            f"student features {s} vs teacher {t}: batch sizes differ ({s[0]} vs {t[0]}); "
            f"{what} compares relations between the samples of one batch — run the teacher "
            "on the same batch as the student"
        )
    dtype = _compute_dtype(student, teacher)
    b = s[0]
    s_rows = student.reshape(b, math.prod(s[1:])).to(dtype)  # (B, D_s)
    t_rows = teacher.reshape(b, math.prod(t[1:])).to(dtype)  # (B, D_t)
    return s_rows, t_rows


def _similarity(x: Tensor) -> Tensor:
    """Row-normalised Gram matrix ``(B, D) -> (B, B)``."""
    return _safe_normalize(x @ x.T, dim=1)


def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """SP loss ``‖G_s − G_t‖²_F / B²`` (Tung & Mori 2019).

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features, flattened to ``(B, D_t)``;
            ``D_t`` may differ from ``D_s``. Detach it yourself if the teacher
            should not receive gradients.

    Returns:
        0-dim tensor, at least float32; exactly 0 for an empty batch.

    Raises:
        ValueError: different batch sizes.
    """
    s, t = _batch_rows(student, teacher, "similarity_preserving_loss")
    b = s.shape[0]
    diff = _similarity(s) - _similarity(t)  # (B, B)
    return diff.pow(2).sum() / max(b * b, 1)


class SimilarityPreservingLoss(nn.Module):
    """Module form of :func:`similarity_preserving_loss`; has no hyper-parameters."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_preserving_loss(student, teacher)
