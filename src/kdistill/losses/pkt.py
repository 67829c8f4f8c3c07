"""Probabilistic Knowledge Transfer (PKT).

Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic
Knowledge Transfer" (ECCV). The samples of a batch define, through a cosine
similarity kernel, a conditional distribution over their neighbours; the
student matches the teacher's distribution with a KL divergence. For
embeddings ``x_i`` ``(B, D)``::

    x̂_i = x_i / (‖x_i‖₂ + eps)
    K_ij = (⟨x̂_i, x̂_j⟩ + 1) / 2                      cosine kernel scaled to [0, 1]
    P_ij = K_ij / Σ_j K_ij                          conditional probabilities (rows)
    loss = mean over (i, j) of P^t_ij · log((P^t_ij + eps) / (P^s_ij + eps))

following the authors' code as used in RepDistiller's ``PKT`` (``eps = 1e-7``):
the KL ``Σ_j`` of each row is averaged over the ``B²`` entries, i.e. the mean
per-row KL divided by ``B``. Only B×B relations are compared, so student and
teacher feature sizes may differ. Identical inputs give exactly 0.

One deviation from the reference: a sample whose features are all zero (its
``x̂`` is 0 either way) gets a zero gradient instead of the reference's ``NaN``
from ``sqrt(0)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.losses.similarity import _batch_rows

__all__ = ["PKTLoss", "pkt_loss"]


def _check_eps(eps: float) -> None:
    if not (eps > 0 and math.isfinite(eps)):  # also rejects NaN
        raise ValueError(f"eps must be a finite number > 0 (1e-7 in the paper's code), got {eps!r}")


def _conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    """Row-stochastic cosine-kernel matrix ``(B, D) -> (B, B)``."""
    sq = (x * x).sum(dim=1, keepdim=True)  # (B, 1)
    ok = sq > 0
    norm = torch.where(ok, torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), 0.0)
    unit = torch.where(ok, x / (norm + eps), torch.zeros_like(x))  # (B, D)
    kernel = (unit @ unit.T + 1.0) / 2.0  # (B, B), in [0, 1]
    return kernel / kernel.sum(dim=1, keepdim=True)  # row sums >= 1/2: no division by 0


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT loss: KL between teacher and student cosine-kernel neighbour distributions.

    Passalis & Tefas 2018; see the module docstring for the exact formula.

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features, flattened to ``(B, D_t)``;
            ``D_t`` may differ. Detach it yourself if the teacher should not
            receive gradients.
        eps: ``> 0``, added to the norms and inside the log ratio.

    Returns:
        0-dim tensor, at least float32; exactly 0 for an empty batch.

    Raises:
        ValueError: different batch sizes or ``eps <= 0``.
    """
    _check_eps(eps)
    s, t = _batch_rows(student, teacher, "pkt_loss")
    b = s.shape[0]
    p_s = _conditional_probabilities(s, eps)  # (B, B)
    p_t = _conditional_probabilities(t, eps)  # (B, B)
    per_entry = p_t * torch.log((p_t + eps) / (p_s + eps))  # (B, B)
    return per_entry.sum() / max(b * b, 1)


class PKTLoss(nn.Module):
    """Module form of :func:`pkt_loss`; holds only ``eps``."""

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        _check_eps(eps)
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pkt_loss(student, teacher, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
