"""Dense-prediction models written plainly: a CenterNet-style detector and a U-Net segmenter.

Both take ``(B, in_channels, H, W)`` images and return one tensor, so they train under the
same Distiller and Trainer as any classifier:

- :class:`CenterNetDetector` → ``(B, C + 4, H/4, W/4)``: ``C`` class-heatmap logits
  (Zhou et al. 2019, "Objects as Points") and the ``(l, t, r, b)`` distances in pixels from
  each cell to the sides of its box (FCOS/TTFNet-style boxes). Backbone stages at strides
  4, 8, 16 feed a small FPN (Lin et al. 2017) whose top-down path ends at stride 4
  (``neck``), then two 3×3 + 1×1 heads (``head.cls``, ``head.box``). Every tensor KD needs
  is a named module: ``neck`` (features), ``head.cls`` (heatmap logits), the output (boxes).
  :func:`decode_detections` turns outputs into boxes: heatmap peaks (3×3 max-pool), top-k,
  then class-wise NMS.
- :class:`UNetSegmenter` → ``(B, C, H, W)`` per-pixel class logits (Ronneberger et al.
  2015): an encoder at strides 2 … 16 (``enc1`` … ``enc3``, ``bottleneck``), a decoder with
  skip connections back to stride 2 (``dec3`` … ``dec1``), a 1×1 ``head`` whose logits are
  upsampled bilinearly to the input size (as DeepLab does from stride 4/8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill.dense.boxes import decode_ltrb, nms

__all__ = [
    "DETECTOR_SIZES",
    "SEGMENTER_SIZES",
    "CenterNetDetector",
    "UNetSegmenter",
    "build_dense_model",
    "decode_detections",
]

DETECTOR_SIZES: dict[str, dict[str, object]] = {
    "teacher": {"widths": (24, 48, 96, 128), "neck": 64},
    "student": {"widths": (8, 16, 32, 48), "neck": 24},
}
"""Named widths for configs (``model: teacher``); any ``widths``/``neck`` may be given instead."""

SEGMENTER_SIZES: dict[str, dict[str, object]] = {
    "teacher": {"widths": (32, 64, 96, 128)},
    "student": {"widths": (8, 16, 32, 48)},
}


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FPN(nn.Module):
    """Top-down feature pyramid ending at the finest input level (Lin et al. 2017).

    ``forward([c_fine, ..., c_coarse])`` → ``(B, out_channels, H_fine, W_fine)``:
    ``p_k = lateral_k(c_k) + upsample(p_{k+1})``, then a 3×3 ``smooth`` conv.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.smooth = conv_bn_relu(out_channels, out_channels)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        p = self.lateral[-1](features[-1])  # coarsest
        for lateral, c in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            p = lateral(c) + F.interpolate(p, size=c.shape[-2:], mode="nearest")
        return self.smooth(p)  # (B, out_channels, H_fine, W_fine)


class CenterNetHead(nn.Module):
    """Class-heatmap logits and box distances: ``(B, C + 4, H, W)``.

    Distances are ``softplus(raw) · box_scale`` pixels (TTFNet scales a ReLU by 16; softplus
    keeps a gradient at 0). The class bias starts at ``log(0.01/0.99)``, a 1 % prior
    (Focal loss, Lin et al. 2017), so the many background cells do not dominate step one.
    """

    def __init__(self, channels: int, num_classes: int, box_scale: float = 16.0) -> None:
        super().__init__()
        self.cls = nn.Sequential(
            conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 1)
        )
        self.box = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, 4, 1))
        self.box_scale = box_scale
        nn.init.constant_(self.cls[-1].bias, -math.log(99.0))

    def forward(self, x: Tensor) -> Tensor:
        heat = self.cls(x)  # (B, C, H, W)
        ltrb = F.softplus(self.box(x)) * self.box_scale  # (B, 4, H, W)
        return torch.cat([heat, ltrb], dim=1)


class CenterNetDetector(nn.Module):
    """Anchor-free single-stage detector with a small FPN; output stride 4.

    Args:
        num_classes: ``C``.
        widths: channels of the stem (stride 2) and the stages at strides 4, 8, 16.
        neck: FPN channels.
        in_channels: image channels.
    """

    stride = 4

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (24, 48, 96, 128),
        neck: int = 64,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must give 4 channel counts (stem, s4, s8, s16), got {widths}")
        w0, w1, w2, w3 = widths
        self.num_classes = num_classes
        self.stem = conv_bn_relu(in_channels, w0, stride=2)  # s2
        self.stage1 = nn.Sequential(conv_bn_relu(w0, w1, 2), conv_bn_relu(w1, w1))  # s4
        self.stage2 = nn.Sequential(conv_bn_relu(w1, w2, 2), conv_bn_relu(w2, w2))  # s8
        self.stage3 = nn.Sequential(conv_bn_relu(w2, w3, 2), conv_bn_relu(w3, w3))  # s16
        self.neck = FPN((w1, w2, w3), neck)
        self.head = CenterNetHead(neck, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        c2 = self.stage1(self.stem(x))  # (B, w1, H/4, W/4)
        c3 = self.stage2(c2)  # (B, w2, H/8, W/8)
        c4 = self.stage3(c3)  # (B, w3, H/16, W/16)
        return self.head(self.neck([c2, c3, c4]))  # (B, C + 4, H/4, W/4)


@torch.no_grad()
def decode_detections(
    output: Tensor,
    num_classes: int,
    stride: float,
    top_k: int = 100,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.6,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Detections per image from CenterNet-style outputs ``(B, C + 4, H, W)``.

    Peaks are cells whose heatmap probability is the maximum of its 3×3 neighbourhood
    (CenterNet's max-pool "NMS"); the ``top_k`` best peaks above ``score_threshold`` keep
    the box decoded at their cell, then class-wise greedy NMS at ``iou_threshold`` removes
    duplicates of one object.

    Returns:
        Per image ``(boxes (n, 4), scores (n,), labels (n,) int64)``, best score first.
    """
    heat = torch.sigmoid(output[:, :num_classes].float())  # (B, C, H, W)
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    boxes = decode_ltrb(output[:, num_classes:].float(), stride)  # (B, H, W, 4)
    b, c, h, w = heat.shape
    scores, flat = peaks.flatten(1).topk(min(top_k, c * h * w))  # (B, k)
    result = []
    for i in range(b):
        keep = scores[i] > score_threshold
        s, idx = scores[i][keep], flat[i][keep]
        labels, cell = idx // (h * w), idx % (h * w)
        bx = boxes[i].view(h * w, 4)[cell]  # (n, 4)
        # one NMS over all classes: shift each class's boxes apart so they never overlap
        offset = labels[:, None].to(bx.dtype) * (bx.max().clamp_min(0) + 1)
        kept = nms(bx + offset, s, iou_threshold)
        result.append((bx[kept], s[kept], labels[kept]))
    return result


class UNetSegmenter(nn.Module):
    """U-Net (Ronneberger et al. 2015) from stride 2 to 16 and back; ``(B, C, H, W)`` logits.

    The first convolution has stride 2 and the stride-2 logits are upsampled bilinearly to
    the input size: four times cheaper than a full-resolution U-Net, and the decoder still
    sees every scale.

    Args:
        num_classes: ``C`` (including background).
        widths: channels at strides 2, 4, 8 and the stride-16 bottleneck.
        in_channels: image channels.
    """

    def __init__(
        self, num_classes: int = 11, widths: Sequence[int] = (32, 64, 96, 128), in_channels: int = 1
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must give 4 channel counts, got {widths}")
        w0, w1, w2, w3 = widths
        self.num_classes = num_classes
        self.enc1 = nn.Sequential(conv_bn_relu(in_channels, w0, 2), conv_bn_relu(w0, w0))
        self.enc2 = nn.Sequential(conv_bn_relu(w0, w1, 2), conv_bn_relu(w1, w1))
        self.enc3 = nn.Sequential(conv_bn_relu(w1, w2, 2), conv_bn_relu(w2, w2))
        self.bottleneck = nn.Sequential(conv_bn_relu(w2, w3, 2), conv_bn_relu(w3, w3))
        self.dec3 = conv_bn_relu(w3 + w2, w2)
        self.dec2 = conv_bn_relu(w2 + w1, w1)
        self.dec1 = conv_bn_relu(w1 + w0, w0)
        self.head = nn.Conv2d(w0, num_classes, 1)

    @staticmethod
    def _up(x: Tensor, skip: Tensor) -> Tensor:
        return torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear"), skip], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)  # (B, w0, H/2, W/2)
        e2 = self.enc2(e1)  # (B, w1, H/4, W/4)
        e3 = self.enc3(e2)  # (B, w2, H/8, W/8)
        b = self.bottleneck(e3)  # (B, w3, H/16, W/16)
        d3 = self.dec3(self._up(b, e3))  # (B, w2, H/8, W/8)
        d2 = self.dec2(self._up(d3, e2))  # (B, w1, H/4, W/4)
        d1 = self.dec1(self._up(d2, e1))  # (B, w0, H/2, W/2)
        logits = self.head(d1)  # (B, C, H/2, W/2)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear")  # (B, C, H, W)


def build_dense_model(
    task: str, num_classes: int, size: str = "student", **kwargs: object
) -> nn.Module:
    """A detector or segmenter by task and named size (``teacher``/``student``); ``kwargs``
    (``widths``, ``neck``) override the named size."""
    sizes = DETECTOR_SIZES if task == "detection" else SEGMENTER_SIZES
    if size not in sizes:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(sizes)}")
    settings = {**sizes[size], **kwargs}
    if task == "detection":
        return CenterNetDetector(num_classes, **settings)  # type: ignore[arg-type]
    if task == "segmentation":
        return UNetSegmenter(num_classes, **settings)  # type: ignore[arg-type]
    raise ValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
