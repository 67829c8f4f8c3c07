"""Box geometry for dense prediction, written plainly in torch (no ``torchvision.ops``).

Boxes are ``(x1, y1, x2, y2)`` in pixels of the input image, ``x2 > x1`` and ``y2 > y1`` for
a real box. Detection targets travel as one padded tensor per batch (see
:func:`pad_boxes`): ``(B, M, 5)`` rows ``(x1, y1, x2, y2, class)``, padding rows all
:data:`PAD` — so a batch is one tensor, as the Trainer's batches are.

This module is the lowest floor of :mod:`kdistill.dense`: the losses
(:mod:`kdistill.losses.dense`) and the models import it; it imports nothing of kdistill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "PAD",
    "box_area",
    "box_iou",
    "decode_ltrb",
    "generalized_box_iou",
    "nms",
    "pad_boxes",
    "unpad_boxes",
]

PAD = -100.0
"""The value of every field of a padding row in a padded ``(B, M, 5)`` box target
(:data:`kdistill.trainer.IGNORE_INDEX`)."""

_EPS = 1e-7


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(...)`` of boxes ``(..., 4)``; 0 for degenerate boxes."""
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(
        0
    )


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``(N, M)`` between boxes ``a`` ``(N, 4)`` and ``b`` ``(M, 4)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = (rb - lt).clamp_min(0).prod(-1)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp_min(_EPS)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise GIoU ``(...)`` of paired boxes ``a``, ``b`` ``(..., 4)``.

    Rezatofighi et al. 2019, "Generalized Intersection over Union":
    ``GIoU = IoU − |C \\ (A ∪ B)| / |C|`` with ``C`` the smallest box enclosing ``A`` and
    ``B``; in ``[-1, 1]``, 1 only for identical boxes.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)  # (...)
    union = box_area(a) + box_area(b) - inter
    iou = inter / union.clamp_min(_EPS)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return iou - (hull - union) / hull.clamp_min(_EPS)


def decode_ltrb(ltrb: Tensor, stride: float) -> Tensor:
    """Boxes ``(B, H, W, 4)`` from per-location distances ``(B, 4, H, W)`` (FCOS, Tian et al. 2019).

    Location ``(i, j)`` of a stride-``s`` map sits at pixel ``((j + ½)·s, (i + ½)·s)``; its box
    is ``(x − l, y − t, x + r, y + b)`` with the distances in pixels.
    """
    _, _, h, w = ltrb.shape
    ys = (torch.arange(h, device=ltrb.device, dtype=ltrb.dtype) + 0.5) * stride  # (H,)
    xs = (torch.arange(w, device=ltrb.device, dtype=ltrb.dtype) + 0.5) * stride  # (W,)
    cx, cy = xs.view(1, 1, w), ys.view(1, h, 1)
    left, top, right, bottom = ltrb.unbind(1)  # each (B, H, W)
    return torch.stack((cx - left, cy - top, cx + right, cy + bottom), dim=-1)  # (B, H, W, 4)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    Args:
        boxes: ``(N, 4)``.
        scores: ``(N,)``.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box exceeds
            this.
    """
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    iou = box_iou(boxes[order], boxes[order])  # (N, N), in score order
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def pad_boxes(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], max_boxes: int | None = None
) -> Tensor:
    """One padded target ``(N, M, 5)`` from per-image boxes ``(m_i, 4)`` and labels ``(m_i,)``.

    Rows are ``(x1, y1, x2, y2, class)``; images with fewer than ``M`` boxes (``M`` the most
    boxes of any image, or ``max_boxes``) are filled with rows of :data:`PAD`.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} box tensors but {len(labels)} label tensors")
    most = max((b.shape[0] for b in boxes), default=0)
    m = max(most if max_boxes is None else max_boxes, 1)
    if most > m:
        raise ValueError(f"an image has {most} boxes, more than max_boxes={max_boxes}")
    out = torch.full((len(boxes), m, 5), PAD)
    for i, (b, c) in enumerate(zip(boxes, labels, strict=True)):
        out[i, : b.shape[0], :4] = b
        out[i, : b.shape[0], 4] = c.to(out.dtype)
    return out


def unpad_boxes(target: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(boxes (m, 4), labels (m,) int64)`` from a padded ``(B, M, 5)`` target."""
    out = []
    for rows in target:
        real = rows[:, 4] != PAD
        out.append((rows[real, :4], rows[real, 4].long()))
    return out


TTF_ALPHA = 0.54
"""Gaussian size factor of TTFNet (Liu et al. 2020): ``σ = α · side / 6``."""


def render_targets(
    target: Tensor, num_classes: int, size: tuple[int, int], stride: float
) -> tuple[Tensor, Tensor, Tensor]:
    """CenterNet/TTFNet training targets of a padded box target on a stride-``s`` grid.

    Zhou et al. 2019, "Objects as Points": each box puts a Gaussian peak of exactly 1 at the
    cell holding its centre, in the heatmap channel of its class; here the Gaussian is
    elliptical with ``σ = 0.54 · side / 6`` per axis (TTFNet, Liu et al. 2020). Every cell
    inside a box's Gaussian regresses that box (the box whose Gaussian is largest there),
    weighted by the Gaussian (TTFNet's box weights, without their log-area factor).

    Args:
        target: ``(B, M, 5)`` padded rows ``(x1, y1, x2, y2, class)`` in input pixels.
        num_classes: ``C``.
        size: ``(H, W)`` of the grid.
        stride: input pixels per grid cell.

    Returns:
        ``heat`` ``(B, C, H, W)`` in ``[0, 1]``; ``boxes`` ``(B, H, W, 4)``, the box each cell
        regresses; ``weight`` ``(B, H, W)``, 0 where a cell regresses nothing.
    """
    h, w = size
    real = target[..., 4] != PAD  # (B, M)
    boxes = torch.where(real[..., None], target[..., :4], torch.zeros_like(target[..., :4]))
    labels = torch.where(real, target[..., 4], torch.zeros_like(target[..., 4])).long()  # (B, M)
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"box class ids must be in [0, {num_classes}); got {labels.unique().tolist()}"
        )
    cx = ((boxes[..., 0] + boxes[..., 2]) / 2 / stride).floor().clamp(0, w - 1)  # (B, M)
    cy = ((boxes[..., 1] + boxes[..., 3]) / 2 / stride).floor().clamp(0, h - 1)
    sx = (TTF_ALPHA * (boxes[..., 2] - boxes[..., 0]) / stride / 6).clamp_min(0.2)  # (B, M)
    sy = (TTF_ALPHA * (boxes[..., 3] - boxes[..., 1]) / stride / 6).clamp_min(0.2)
    xs = torch.arange(w, dtype=target.dtype, device=target.device).view(1, 1, 1, w)
    ys = torch.arange(h, dtype=target.dtype, device=target.device).view(1, 1, h, 1)
    dx = (xs - cx[..., None, None]) / sx[..., None, None]  # (B, M, 1, W)
    dy = (ys - cy[..., None, None]) / sy[..., None, None]  # (B, M, H, 1)
    gauss = torch.exp(-(dx * dx + dy * dy) / 2) * real[..., None, None]  # (B, M, H, W)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(gauss.dtype) * real[..., None]
    heat = (gauss[:, :, None] * onehot[..., None, None]).amax(dim=1)  # (B, C, H, W)
    best, which = gauss.max(dim=1)  # (B, H, W)
    chosen = torch.gather(boxes, 1, which.flatten(1)[..., None].expand(-1, -1, 4))  # (B, HW, 4)
    chosen = chosen.view(-1, h, w, 4)
    px = (xs.view(1, 1, w) + 0.5) * stride  # cell centres in pixels
    py = (ys.view(1, h, 1) + 0.5) * stride
    inside = (
        (px > chosen[..., 0])
        & (px < chosen[..., 2])
        & (py > chosen[..., 1])
        & (py < chosen[..., 3])
    )
    return heat, chosen, best * inside
