"""Distillation and baseline losses.

Each loss is a pure function plus a thin ``nn.Module`` that only holds the
hyper-parameters (like ``torch.nn.functional`` vs ``torch.nn``). All losses
share one convention: logits ``(..., C)`` with every leading dim a row, an
optional boolean ``mask`` of the leading shape ``(...)``, mean over the True
rows, exactly ``0`` when no row counts.
"""

from __future__ import annotations

from kdistill.losses.kd import HintonLoss, KDLoss, hinton_loss, kd_loss
from kdistill.losses.label_smoothing import (
    LabelSmoothingCrossEntropy,
    cross_entropy,
    label_smoothing_cross_entropy,
)

__all__ = [
    "HintonLoss",
    "KDLoss",
    "LabelSmoothingCrossEntropy",
    "cross_entropy",
    "hinton_loss",
    "kd_loss",
    "label_smoothing_cross_entropy",
]
