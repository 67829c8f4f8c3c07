"""Distillation and baseline losses.

Each loss is a pure function plus a thin ``nn.Module`` that only holds the
hyper-parameters (like ``torch.nn.functional`` vs ``torch.nn``). Module forwards take the
student tensor first and the teacher tensor (or the labels) second. Logit losses share one
convention: logits ``(..., C)`` with every leading dim a row, an optional boolean ``mask``
of the leading shape ``(...)``, mean over the True rows, exactly ``0`` when no row counts.

- response-based: :func:`kd_loss` (Hinton), :func:`hinton_loss` (KD + CE),
  :func:`label_smoothing_cross_entropy` (the no-teacher baseline)
- feature-based: :func:`hint_loss` (FitNets), :func:`attention_transfer_loss` (AT),
  :func:`cosine_loss`
- relation-based: :func:`rkd_loss` (RKD), :func:`similarity_preserving_loss` (SP),
  :func:`pkt_loss` (PKT), :func:`correlation_congruence_loss` (CC)
- modern logit/representation losses: :func:`dkd_loss` (DKD), :func:`dist_loss` (DIST),
  :class:`CRDLoss` (CRD, with its memory bank)

Losses that also need the labels set ``requires_target = True`` and take them as a third
argument; losses that need dataset sample indices set ``requires_index = True`` and take
``index=``. :class:`~kdistill.distiller.LossTerm` passes both when asked.
"""

from __future__ import annotations

from kdistill.losses.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from kdistill.losses.correlation import CorrelationCongruenceLoss, correlation_congruence_loss
from kdistill.losses.cosine import CosineLoss, cosine_loss
from kdistill.losses.crd import CRDLoss, crd_nce_loss
from kdistill.losses.dist import DISTLoss, dist_loss, dist_parts
from kdistill.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from kdistill.losses.fitnets import HintLoss, hint_loss
from kdistill.losses.kd import HintonLoss, KDLoss, hinton_loss, kd_loss
from kdistill.losses.label_smoothing import (
    LabelSmoothingCrossEntropy,
    cross_entropy,
    label_smoothing_cross_entropy,
)
from kdistill.losses.pkt import PKTLoss, pkt_loss
from kdistill.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss, rkd_loss
from kdistill.losses.similarity import SimilarityPreservingLoss, similarity_preserving_loss

__all__ = [
    "AttentionTransferLoss",
    "CRDLoss",
    "CorrelationCongruenceLoss",
    "CosineLoss",
    "DISTLoss",
    "DKDLoss",
    "HintLoss",
    "HintonLoss",
    "KDLoss",
    "LabelSmoothingCrossEntropy",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "attention_map",
    "attention_transfer_loss",
    "correlation_congruence_loss",
    "cosine_loss",
    "crd_nce_loss",
    "cross_entropy",
    "dist_loss",
    "dist_parts",
    "dkd_loss",
    "dkd_parts",
    "hint_loss",
    "hinton_loss",
    "kd_loss",
    "label_smoothing_cross_entropy",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "similarity_preserving_loss",
]
