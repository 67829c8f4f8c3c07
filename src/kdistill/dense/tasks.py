"""The supervised (label) losses of the two dense tasks, as loss terms take them.

Both follow the loss convention of :class:`~kdistill.distiller.LossTerm`: called as
``loss(student_output, target)`` with ``teacher: null`` in the term.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill.dense.boxes import decode_ltrb, generalized_box_iou, render_targets

__all__ = [
    "CenterNetLoss",
    "SegmentationCrossEntropy",
    "centernet_focal_loss",
    "centernet_loss",
    "segmentation_cross_entropy",
]


def centernet_focal_loss(
    logits: Tensor, heat: Tensor, alpha: float = 2.0, beta: float = 4.0
) -> Tensor:
    """Penalty-reduced pixel-wise focal loss of CenterNet (Zhou et al. 2019, eq. 1).

    With ``p = σ(logits)`` and the Gaussian target ``Y``::

        L = −1/N · Σ { (1 − p)^α · log p               where Y = 1
                     { (1 − Y)^β · p^α · log(1 − p)    otherwise

    ``N`` the number of peaks (``Y = 1``), at least 1.

    Args:
        logits: ``(B, C, H, W)``.
        heat: ``(B, C, H, W)`` in ``[0, 1]``.
    """
    p = torch.sigmoid(logits)
    pos = heat >= 1.0
    pos_term = (1 - p).pow(alpha) * F.logsigmoid(logits)
    neg_term = (1 - heat).pow(beta) * p.pow(alpha) * F.logsigmoid(-logits)
    total = torch.where(pos, pos_term, neg_term).sum()
    return -total / pos.sum().clamp_min(1)


def centernet_loss(
    output: Tensor, target: Tensor, stride: float, box_weight: float = 5.0
) -> Tensor:
    """Focal heatmap loss + GIoU box loss of a CenterNet/TTFNet head.

    Args:
        output: ``(B, C + 4, H, W)``: ``C`` heatmap logits, then ``(l, t, r, b)`` in pixels.
        target: ``(B, M, 5)`` padded boxes (:func:`kdistill.dense.boxes.pad_boxes`).
        stride: input pixels per cell.
        box_weight: TTFNet's weight of the box term (5).

    Returns:
        ``focal + box_weight · Σ w·(1 − GIoU) / Σ w`` over the cells that regress a box
        (:func:`~kdistill.dense.boxes.render_targets`).
    """
    c = output.shape[1] - 4
    heat, boxes, weight = render_targets(target.to(output.dtype), c, output.shape[-2:], stride)
    focal = centernet_focal_loss(output[:, :c], heat)
    predicted = decode_ltrb(output[:, c:], stride)  # (B, H, W, 4)
    giou = (1 - generalized_box_iou(predicted, boxes)) * weight  # (B, H, W)
    return focal + box_weight * giou.sum() / weight.sum().clamp_min(1e-6)


class CenterNetLoss(nn.Module):
    """Module form of :func:`centernet_loss`; the label term of a detection run."""

    def __init__(self, stride: float = 4.0, box_weight: float = 5.0) -> None:
        super().__init__()
        self.stride = stride
        self.box_weight = box_weight

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        if target.dim() != 3 or target.shape[-1] != 5:
            raise ValueError(
                f"the detection target must be padded boxes (B, M, 5), got {tuple(target.shape)}"
            )
        return centernet_loss(output, target, self.stride, self.box_weight)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, box_weight={self.box_weight}"


def segmentation_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-pixel cross-entropy averaged over the pixels whose label is not ``ignore_index``.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` class ids.

    Returns:
        0-dim tensor; 0 when every pixel is ignored.
    """
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target {tuple(target.shape)} must be the logits' (B, H, W) = "
            f"{tuple(logits.shape[:1] + logits.shape[2:])}"
        )
    per = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
    return per / (target != ignore_index).sum().clamp_min(1)


class SegmentationCrossEntropy(nn.Module):
    """Module form of :func:`segmentation_cross_entropy`; the label term of a segmentation run."""

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return segmentation_cross_entropy(logits, target, self.ignore_index)
