"""Batched, generator-driven views for self-supervised schemes (DINO, Mean Teacher).

Label-free distillation learns what its views leave unchanged, so the views must differ in
more than position: a network with global average pooling is almost shift-invariant by
construction, and ±2 px shifts + flips (:func:`kdistill.data.loader.random_shift_flip`) teach
it next to nothing. :func:`random_resized_crop` is SimCLR/DINO's main augmentation (a random
crop of 30–100 % of the area, stretched back to full size, flipped half of the time) plus a
brightness/contrast jitter, for any ``(B, C, H, W)`` batch; every random number comes from
the ``generator`` argument, like the loader's augmentations, so views are reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_resized_crop(
    images: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    jitter: float = 0.4,
) -> Tensor:
    """Random crops resized back to ``H × W``, flips, and brightness/contrast jitter.

    Args:
        images: ``(B, C, H, W)``, any normalisation.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        flip: mirror half of the crops horizontally.
        jitter: contrast factor in ``[1 − jitter, 1 + jitter]`` around each image's mean, and
            a brightness shift in ``[−jitter, jitter]`` × the image's std; 0 disables.

    Returns:
        ``(B, C, H, W)`` on the device of ``images`` (random numbers are drawn on CPU).
    """
    b = images.shape[0]
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    area = _uniform(b, scale[0], scale[1], generator)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the image's width
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = _uniform(b, -1.0, 1.0, generator) * (1.0 - width)  # centre in [-1, 1] coordinates
    cy = _uniform(b, -1.0, 1.0, generator) * (1.0 - height)
    mirror = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    sx = torch.where(mirror, -width, width)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        contrast = _uniform(b, 1.0 - jitter, 1.0 + jitter, generator).to(out.device, out.dtype)
        shift = _uniform(b, -jitter, jitter, generator).to(out.device, out.dtype)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        std = out.std(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast.view(-1, 1, 1, 1) + mean + shift.view(-1, 1, 1, 1) * std
    return out
