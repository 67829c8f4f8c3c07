"""Distillation losses for dense prediction: detection and semantic segmentation.

Feature maps and logits are ``(B, C, H, W)`` (channels first, as conv nets give them).
Each loss is a pure function plus a thin module holding its hyper-parameters.

- :func:`channel_wise_distillation_loss` — CWD (Shu et al. 2021), per-channel spatial
  distributions, on feature maps or logits;
- :func:`pearson_feature_loss` — PKD (Cao et al. 2022), channel-standardised features;
- :func:`pixel_kd_loss` — pixel-wise KD on segmentation logits (Liu et al. 2019);
- :func:`heatmap_kd_loss` — KD on a detector's sigmoid class heatmaps, weighted towards
  foreground;
- :func:`box_kd_loss` — box-regression distillation where the teacher is confident.

Channel mismatches (CWD and PKD on features) are handled by the distiller's adapters
(``same_shape = True``: a 1×1 conv + BatchNorm, with resizing, from a dry run; see
:mod:`kdistill.adapters`), never inside the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill.dense.boxes import decode_ltrb, generalized_box_iou, render_targets
from kdistill.losses._reduce import _compute_dtype
from kdistill.losses.fitnets import _check_same_shape
from kdistill.losses.kd import _check_temperature, kd_loss

__all__ = [
    "BoxKDLoss",
    "ChannelWiseDistillationLoss",
    "HeatmapKDLoss",
    "PearsonFeatureLoss",
    "PixelKDLoss",
    "box_kd_loss",
    "channel_wise_distillation_loss",
    "heatmap_kd_loss",
    "pearson_feature_loss",
    "pixel_kd_loss",
    "standardise_channels",
]

Weighting = Literal["teacher", "gt", "none"]


def _check_maps(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() < 3:
        raise ValueError(
            f"{what} expects maps (B, C, H, W) (or (B, C, L)); got student {tuple(student.shape)}"
        )
    _check_same_shape(student, teacher, what)


# -- CWD ---------------------------------------------------------------------------------


def channel_wise_distillation_loss(
    student: Tensor, teacher: Tensor, temperature: float = 4.0
) -> Tensor:
    """Channel-wise distillation (CWD).

    Shu, Liu, Gao, Yan & Shen 2021, "Channel-wise Knowledge Distillation for Dense
    Prediction", eq. (3)-(4). Each channel ``c`` of a map becomes a distribution over its
    ``H·W`` positions, ``φ(y_c)_i = exp(y_{c,i}/τ) / Σ_j exp(y_{c,j}/τ)``, and::

        L = τ² / C · Σ_c Σ_i φ(y^T_c)_i · log(φ(y^T_c)_i / φ(y^S_c)_i)

    averaged over the batch too (divided by ``B·C``, as in mmrazor's
    ``ChannelWiseDivergence``).

    Args:
        student: ``(B, C, H, W)`` (any ``(B, C, ...)``), adapted to the teacher's shape.
        teacher: same shape.
        temperature: ``τ > 0``.

    Returns:
        0-dim tensor, at least float32.
    """
    _check_temperature(temperature)
    _check_maps(student, teacher, "channel_wise_distillation_loss")
    dtype = _compute_dtype(student, teacher)
    s = student.to(dtype).flatten(2) / temperature  # (B, C, HW)
    t = teacher.to(dtype).flatten(2) / temperature  # (B, C, HW)
    log_p_t = torch.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - torch.log_softmax(s, dim=-1))).sum(-1)  # (B, C)
    return kl.mean() * temperature**2


class ChannelWiseDistillationLoss(nn.Module):
    """Module form of :func:`channel_wise_distillation_loss`; holds ``temperature``."""

    same_shape = True  # an adapter maps a narrower student map onto the teacher's

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return channel_wise_distillation_loss(student, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# -- PKD ---------------------------------------------------------------------------------


def standardise_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x − μ_c) / sqrt(σ²_c + eps)`` per channel, the statistics over ``N·H·W``.

    ``x`` is ``(B, C, ...)``; ``σ²`` is the population variance (divided by ``N·H·W``).
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)  # (1, C, 1, 1)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def pearson_feature_loss(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """PKD: MSE between channel-standardised student and teacher features, halved.

    Cao, Li, Wang, Xue, Yuan & Wang 2022, "PKD: General Distillation Framework for Object
    Detectors via Pearson Correlation Coefficient", eq. (4)-(5)::

        ŝ = standardise(s),  t̂ = standardise(t)   (per channel, over N·H·W)
        L = ½ · mean((ŝ − t̂)²) = 1 − mean_c r_c

    where ``r_c`` is the Pearson correlation of channel ``c`` of the two maps (exactly, with
    the population variance and ``eps = 0``; mmrazor's ``PKDLoss`` uses the unbiased
    standard deviation, a factor ``(n − 1)/n`` away). Invariant to a per-channel affine
    change of either map, so teachers and students of different families compare.

    Args:
        student: ``(B, C, H, W)``, adapted to the teacher's shape.
        teacher: same shape.
        eps: added to the variance.

    Returns:
        0-dim tensor in ``[0, 2]``, at least float32.
    """
    _check_maps(student, teacher, "pearson_feature_loss")
    dtype = _compute_dtype(student, teacher)
    s = standardise_channels(student.to(dtype), eps)
    t = standardise_channels(teacher.to(dtype), eps)
    return F.mse_loss(s, t) / 2


class PearsonFeatureLoss(nn.Module):
    """Module form of :func:`pearson_feature_loss`; holds ``eps``."""

    same_shape = True

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pearson_feature_loss(student, teacher, self.eps)


# -- pixel-wise KD -----------------------------------------------------------------------


def pixel_kd_loss(
    student: Tensor,
    teacher: Tensor,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Pixel-wise distillation of segmentation logits.

    Liu, Chen, Liu, Qin, Luo & Wang 2019, "Structured Knowledge Distillation for Semantic
    Segmentation", §3.1: the KL divergence of the class distributions at every pixel,
    averaged over pixels — Hinton's KD per pixel::

        L = T² / |P| · Σ_{i∈P} KL(softmax(z^T_i / T) ‖ softmax(z^S_i / T))

    ``P`` is every pixel, or those whose label is not ``ignore_index`` when ``target`` is
    given.

    Args:
        student: ``(B, C, H, W)`` logits.
        teacher: ``(B, C, H, W)``.
        temperature: ``T > 0``.
        target: optional ``(B, H, W)`` labels, only to mask ``ignore_index`` pixels.
        ignore_index: the label of pixels that do not count.

    Returns:
        0-dim tensor; exactly 0 when no pixel counts.
    """
    _check_maps(student, teacher, "pixel_kd_loss")
    mask = None
    if target is not None:
        if target.shape != student.shape[:1] + student.shape[2:]:
            raise ValueError(
                f"target {tuple(target.shape)} must be the logits' (B, H, W) = "
                f"{tuple(student.shape[:1] + student.shape[2:])}"
            )
        mask = target != ignore_index  # (B, H, W)
    return kd_loss(student.movedim(1, -1), teacher.movedim(1, -1), temperature, mask)


class PixelKDLoss(nn.Module):
    """Module form of :func:`pixel_kd_loss`; gets the labels only to skip ignored pixels."""

    requires_target = True

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return pixel_kd_loss(student, teacher, self.temperature, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"


# -- detection heads ---------------------------------------------------------------------


def heatmap_kd_loss(
    student: Tensor, teacher: Tensor, weight: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """KD on sigmoid class heatmaps: the binary KL of every (class, position), weighted.

    Each heatmap logit is an independent Bernoulli (CenterNet, Zhou et al. 2019), so
    Hinton's soft targets become binary: with ``p = σ(z^T/T)`` and ``q = σ(z^S/T)``::

        ℓ = T² · [p·log(p/q) + (1 − p)·log((1 − p)/(1 − q))]      (per element)
        L = Σ w·ℓ / Σ w

    i.e. sigmoid binary cross-entropy against the teacher's probabilities minus its
    entropy (0 for identical heatmaps). Foreground weighting (``w`` high where objects are)
    keeps the many background cells from swamping the loss — Chen et al. 2017, "Learning
    Efficient Object Detection Models with Knowledge Distillation", weight the background
    class of the soft-target term down for the same reason.

    Args:
        student: ``(B, C, H, W)`` heatmap logits.
        teacher: same shape.
        weight: ``(B, 1 or C, H, W)`` ≥ 0, or ``None`` for the plain mean.
        temperature: ``T > 0``.

    Returns:
        0-dim tensor; 0 when every weight is 0.
    """
    _check_temperature(temperature)
    _check_maps(student, teacher, "heatmap_kd_loss")
    dtype = _compute_dtype(student, teacher)
    s = student.to(dtype) / temperature  # (B, C, H, W)
    t = teacher.to(dtype) / temperature
    p = torch.sigmoid(t)
    # log p = logsigmoid(t), log(1 − p) = logsigmoid(−t): finite for any logit
    per = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    per = per * temperature**2  # (B, C, H, W)
    if weight is None:
        return per.mean()
    weight = weight.to(dtype).expand_as(per)
    return (per * weight).sum() / weight.sum().clamp_min(torch.finfo(dtype).tiny)


class HeatmapKDLoss(nn.Module):
    """Module form of :func:`heatmap_kd_loss` on a detector's class-heatmap logits.

    Args:
        temperature: ``T``.
        weighting: ``"teacher"`` — ``w = background + max_c σ(z^T_c)``, the teacher's own
            foreground (Gaussian blobs around its detections); ``"gt"`` — ``w = background +
            max_c G_c``, the ground-truth Gaussian heatmap (:func:`render_targets`; needs the
            padded box target and ``stride``); ``"none"`` — the plain mean.
        background: the weight floor on background cells.
        stride: input pixels per heatmap cell (``"gt"`` only).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        weighting: Weighting = "teacher",
        background: float = 0.05,
        stride: float = 4.0,
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if weighting not in ("teacher", "gt", "none"):
            raise ValueError(f"weighting must be 'teacher', 'gt' or 'none', got {weighting!r}")
        if not background >= 0:
            raise ValueError(f"background must be >= 0, got {background}")
        self.temperature = temperature
        self.weighting = weighting
        self.background = background
        self.stride = stride
        self.requires_target = weighting == "gt"

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        weight = None
        if self.weighting == "teacher":
            weight = torch.sigmoid(teacher.detach()).amax(1, keepdim=True) + self.background
        elif self.weighting == "gt":
            if target is None:
                raise ValueError("weighting='gt' needs the padded box target (B, M, 5)")
            heat, _, _ = render_targets(
                target.to(teacher.dtype), teacher.shape[1], teacher.shape[-2:], self.stride
            )
            weight = heat.amax(1, keepdim=True) + self.background
        return heatmap_kd_loss(student, teacher, weight, self.temperature)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, weighting={self.weighting!r}, "
            f"background={self.background}"
        )


def box_kd_loss(
    student_boxes: Tensor,
    teacher_boxes: Tensor,
    weight: Tensor,
    kind: Literal["giou", "l1"] = "giou",
    scale: float = 1.0,
) -> Tensor:
    """Box-regression distillation: the student's boxes regress the teacher's, weighted.

    The teacher's boxes are soft regression targets where the teacher is confident (Mehta &
    Ozturk 2018, "Object detection at 200 Frames Per Second", §3.2: the regression outputs are
    distilled only where the teacher's objectness is high, scaled by it)::

        L = Σ_i w_i · ℓ(b^S_i, b^T_i) / Σ_i w_i
        ℓ = 1 − GIoU(b^S, b^T)                 (kind="giou", Rezatofighi et al. 2019)
        ℓ = Σ_k |b^S_k − b^T_k| / (4 · scale)  (kind="l1", coordinates in units of scale)

    Args:
        student_boxes: ``(..., 4)`` ``(x1, y1, x2, y2)``.
        teacher_boxes: ``(..., 4)``.
        weight: ``(...)`` ≥ 0 (0 where the teacher is not confident).
        kind: ``"giou"`` or ``"l1"``.
        scale: the unit of the L1 distance (e.g. the stride), ``kind="l1"`` only.

    Returns:
        0-dim tensor; 0 when every weight is 0.
    """
    if student_boxes.shape != teacher_boxes.shape or student_boxes.shape[-1] != 4:
        raise ValueError(
            f"student boxes {tuple(student_boxes.shape)} and teacher boxes "
            f"{tuple(teacher_boxes.shape)} must both be (..., 4)"
        )
    if weight.shape != student_boxes.shape[:-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be the boxes' leading shape "
            f"{tuple(student_boxes.shape[:-1])}"
        )
    dtype = _compute_dtype(student_boxes, teacher_boxes)
    s, t, w = student_boxes.to(dtype), teacher_boxes.to(dtype), weight.to(dtype)
    if kind == "giou":
        per = 1 - generalized_box_iou(s, t)  # (...)
    elif kind == "l1":
        per = (s - t).abs().sum(-1) / (4 * scale)
    else:
        raise ValueError(f"kind must be 'giou' or 'l1', got {kind!r}")
    return (per * w).sum() / w.sum().clamp_min(torch.finfo(dtype).tiny)


class BoxKDLoss(nn.Module):
    """:func:`box_kd_loss` on the whole output of a CenterNet-style head.

    Takes the detector outputs ``(B, C + 4, H, W)`` of student and teacher — ``C`` heatmap
    logits, then the ``(l, t, r, b)`` distances in pixels (:mod:`kdistill.dense.models`) —
    decodes the boxes of every cell (:func:`~kdistill.dense.boxes.decode_ltrb`) and weighs
    each cell by the teacher's confidence ``max_c σ(z^T_c)`` where it is at least
    ``threshold`` (0 elsewhere).

    Args:
        num_classes: ``C``.
        stride: input pixels per cell.
        threshold: the teacher confidence below which a cell is not distilled.
        kind: ``"giou"`` or ``"l1"`` (in units of the stride).
    """

    def __init__(
        self,
        num_classes: int,
        stride: float = 4.0,
        threshold: float = 0.3,
        kind: Literal["giou", "l1"] = "giou",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if kind not in ("giou", "l1"):
            raise ValueError(f"kind must be 'giou' or 'l1', got {kind!r}")
        self.num_classes, self.stride, self.threshold, self.kind = (
            num_classes,
            stride,
            threshold,
            kind,
        )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_maps(student, teacher, "BoxKDLoss")
        if student.shape[1] != self.num_classes + 4:
            raise ValueError(
                f"expected detector outputs with num_classes + 4 = {self.num_classes + 4} "
                f"channels, got {student.shape[1]}; set the loss's num_classes"
            )
        c = self.num_classes
        confidence = torch.sigmoid(teacher[:, :c].detach()).amax(1)  # (B, H, W)
        weight = torch.where(confidence >= self.threshold, confidence, 0.0)
        s_boxes = decode_ltrb(student[:, c:], self.stride)  # (B, H, W, 4)
        t_boxes = decode_ltrb(teacher[:, c:].detach(), self.stride)
        return box_kd_loss(s_boxes, t_boxes, weight, self.kind, self.stride)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, stride={self.stride}, "
            f"threshold={self.threshold}, kind={self.kind!r}"
        )
