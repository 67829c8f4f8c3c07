"""Relational Knowledge Distillation (RKD): distance-wise and angle-wise losses.

Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (CVPR). The
student mimics the *relations* between the embeddings ``e_i`` ``(B, D)`` of a
batch rather than the embeddings themselves, so student and teacher sizes may
differ. With ``l_δ`` the Huber loss (``F.smooth_l1_loss``, δ = 1):

Distance-wise, pairwise distances normalised by their mean over the pairs
``i ≠ j``::

    ψ_D(i, j) = ‖e_i − e_j‖₂ / μ,   μ = 1/(B(B−1)) Σ_{i≠j} ‖e_i − e_j‖₂
    L_D = mean over (i, j) of l_δ(ψ_D^s(i, j), ψ_D^t(i, j))

Angle-wise, the cosine of the angle at ``e_i`` of the triangle ``(e_j, e_i, e_k)``::

    ψ_A(i, j, k) = ⟨(e_j − e_i)/‖e_j − e_i‖, (e_k − e_i)/‖e_k − e_i‖⟩
    L_A = mean over (i, j, k) of l_δ(ψ_A^s(i, j, k), ψ_A^t(i, j, k))

    rkd_loss = distance_weight · L_D + angle_weight · L_A

The means run over all ``B²`` pairs / ``B³`` triplets (degenerate ones such as
``i = j`` have ψ = 0 on both sides and contribute 0), exactly as in the
authors' code and RepDistiller's ``RKDLoss``, whose weights 25 and 50 (the
paper's 1 : 2 ratio) are the defaults. One difference from RepDistiller: μ
averages over all pairs ``i ≠ j`` (the paper's definition) rather than over the
strictly positive distances; they agree unless the batch contains duplicates.

Both terms are invariant to translating, rotating or (positively) scaling
either embedding set — the distances are mean-normalised and angles are
scale-free — and to permuting the batch (same permutation for both).

Numerics: distances use the Gram form ``‖a‖² + ‖b‖² − 2⟨a, b⟩`` on
batch-centred embeddings (memory ``O(B² + B·D)``); the diagonal is set to 0
*before* the square root and squared distances ``<= eps`` give distance 0 with
a zero gradient, so identical samples never produce ``NaN`` gradients (from
``sqrt(0)``). Angles need the ``(B, B, D)`` difference vectors (memory
``O(B²·D + B³)``, as in the reference); a zero difference (``i = j`` or two
identical samples) gives a zero unit vector with zero gradient. A batch of one
sample (no pairs) gives exactly 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses.cosine import _safe_normalize
from kdistill.losses.similarity import _batch_rows

__all__ = ["RKDLoss", "rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]

_EPS = 1e-12


def _check_weight(name: str, weight: float) -> None:
    if not (weight >= 0 and math.isfinite(weight)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")


def _pairwise_distances(e: Tensor, eps: float = _EPS) -> Tensor:
    """Euclidean distances ``(B, D) -> (B, B)`` with an exactly-zero, zero-gradient diagonal."""
    b = e.shape[0]
    e = e - e.mean(dim=0, keepdim=True)  # translation-invariant; less cancellation below
    sq_norm = (e * e).sum(dim=1)  # (B,)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * (e @ e.T)  # (B, B)
    eye = torch.eye(b, dtype=torch.bool, device=e.device)
    ok = (sq > eps) & ~eye  # rounding can leave the diagonal / duplicates slightly != 0
    return torch.where(ok, torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), 0.0)


def _normalized_distances(e: Tensor) -> Tensor:
    """Pairwise distances ``(B, B)`` divided by their mean over the pairs ``i ≠ j``."""
    b = e.shape[0]
    d = _pairwise_distances(e)  # (B, B)
    mean = d.sum() / max(b * (b - 1), 1)
    return d / mean.clamp_min(_EPS)


def _angles(e: Tensor) -> Tensor:
    """Cosines ``(B, D) -> (B, B, B)``; ``[i, j, k] = cos ∠(e_j − e_i, e_k − e_i)``."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # (B, B, D): diff[i, j] = e_j − e_i
    unit = _safe_normalize(diff, dim=2)  # (B, B, D)
    return unit @ unit.transpose(1, 2)  # (B, B, B)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance-wise loss ``L_D`` (Park et al. 2019), mean over the ``B²`` pairs.

    Args:
        student: ``(B, ...)`` student embeddings, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher embeddings, flattened to ``(B, D_t)``;
            ``D_t`` may differ. Detach it yourself if the teacher should not
            receive gradients.

    Returns:
        0-dim tensor, at least float32; exactly 0 when ``B < 2``.
    """
    s, t = _batch_rows(student, teacher, "rkd_distance_loss")
    b = s.shape[0]
    per_pair = F.smooth_l1_loss(
        _normalized_distances(s), _normalized_distances(t), reduction="none"
    )  # (B, B)
    return per_pair.sum() / max(b * b, 1)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle-wise loss ``L_A`` (Park et al. 2019), mean over the ``B³`` triplets.

    Args:
        student: ``(B, ...)`` student embeddings, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher embeddings, flattened to ``(B, D_t)``.

    Returns:
        0-dim tensor, at least float32; exactly 0 when ``B < 2``. Memory
        ``O(B²·D)`` for the difference vectors.
    """
    s, t = _batch_rows(student, teacher, "rkd_angle_loss")
    b = s.shape[0]
    per_triplet = F.smooth_l1_loss(_angles(s), _angles(t), reduction="none")  # (B, B, B)
    return per_triplet.sum() / max(b * b * b, 1)


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """RKD-DA loss ``distance_weight · L_D + angle_weight · L_A`` (Park et al. 2019).

    Args:
        student: ``(B, ...)`` student embeddings (e.g. the penultimate layer),
            flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher embeddings, flattened to ``(B, D_t)``.
        distance_weight: ``>= 0``; 25 in RepDistiller.
        angle_weight: ``>= 0``; 50 in RepDistiller. With 0 the ``O(B²·D)``
            angle computation is skipped.

    Returns:
        0-dim tensor, at least float32.

    Raises:
        ValueError: different batch sizes or a negative / non-finite weight.
    """
    _check_weight("distance_weight", distance_weight)
    _check_weight("angle_weight", angle_weight)
    loss = distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight != 0:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher)
    return loss


class RKDLoss(nn.Module):
    """Module form of :func:`rkd_loss`; holds only ``distance_weight`` and ``angle_weight``."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        _check_weight("distance_weight", distance_weight)
        _check_weight("angle_weight", angle_weight)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_loss(student, teacher, self.distance_weight, self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
