"""Cross-entropy with hard labels, with and without label smoothing.

Label smoothing is the "no-teacher" baseline for distillation: like KD it
trains against a soft target, but the soft part is uniform instead of coming
from a teacher.

Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision" (Inception-v3), Sec. 7: the one-hot target ``y`` is replaced by::

    q = (1 − ε) · onehot(y) + ε / C

and the loss is the cross-entropy ``H(q, softmax(z)) = −Σ_c q_c · log softmax(z)_c``
(equal to ``(1 − ε) · CE(y, z) + ε · mean_c(−log softmax(z)_c)``).

Shapes follow the package convention (see ``_reduce``): logits ``(..., C)``,
integer class-index targets ``(...)``, optional boolean ``mask`` ``(...)``;
the loss is averaged over the rows where the mask is True (exactly 0 if none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._reduce import _check_mask, _compute_dtype, _flatten_rows, _masked_mean

__all__ = ["LabelSmoothingCrossEntropy", "cross_entropy", "label_smoothing_cross_entropy"]


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension, shape (..., C); got a 0-dim tensor")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices (torch.long), got dtype {target.dtype}; "
            "for soft / probability targets use kd_loss"
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits have shape "
            f"{tuple(logits.shape)}; target must be class indices with the logits' leading "
            f"shape {tuple(logits.shape[:-1])} (logits (..., C) -> target (...))"
        )


def _check_smoothing(smoothing: float) -> None:
    if not (0.0 <= smoothing < 1.0):  # also rejects NaN
        raise ValueError(f"smoothing (epsilon) must be in [0, 1), got {smoothing!r}")


def label_smoothing_cross_entropy(
    logits: Tensor,
    target: Tensor,
    smoothing: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Label-smoothed cross-entropy (Szegedy et al. 2016, Inception-v3).

    ``loss = mean over rows of −Σ_c q_c · log softmax(z)_c`` with
    ``q = (1 − ε) · onehot(y) + ε / C``.

    For ``(N, C)`` logits without a mask this equals
    ``F.cross_entropy(logits, target, label_smoothing=ε)``.

    Args:
        logits: ``(..., C)`` unnormalised scores; all leading dims are rows.
        target: ``(...)`` integer class indices in ``[0, C)`` (rows with
            mask False may hold anything, e.g. ``-100``).
        smoothing: ``ε`` in ``[0, 1)``; ``0`` is plain cross-entropy.
        mask: optional ``(...)`` bool; only True rows count and the mean is
            over True rows. No True row gives exactly ``0``.

    Returns:
        0-dim tensor, at least float32 (float16/bfloat16 inputs are upcast).
    """
    _check_smoothing(smoothing)
    _check_logits_target(logits, target)
    flat_mask = _check_mask(mask, logits.shape[:-1], "logits")
    rows = _flatten_rows(logits, flat_mask).to(_compute_dtype(logits))  # (M, C)
    targets = _flatten_rows(target, flat_mask, event_ndim=0).to(rows.device)  # (M,)
    per_row = F.cross_entropy(rows, targets, reduction="none", label_smoothing=smoothing)  # (M,)
    return _masked_mean(per_row)


def cross_entropy(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plain hard-label cross-entropy ``mean over rows of −log softmax(z)_y``.

    Same conventions as :func:`label_smoothing_cross_entropy` (which it is,
    with ``ε = 0``): logits ``(..., C)``, class indices ``(...)``, optional
    bool mask ``(...)``, mean over True rows, exactly 0 if no row counts.
    """
    return label_smoothing_cross_entropy(logits, target, smoothing=0.0, mask=mask)


class LabelSmoothingCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothing_cross_entropy`; holds only ``smoothing``."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        _check_smoothing(smoothing)
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return label_smoothing_cross_entropy(logits, target, self.smoothing, mask)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"
