"""Adapters that map a student tensor onto the shape of the teacher tensor it is compared with.

FitNets (Romero et al., 2015) trains a "regressor" from the student's guided layer to the
teacher's hint layer because the two rarely have the same width. kdistill builds such
adapters from one dry-run forward pass of both models, so users name layers and never
compute channel counts by hand:

- feature maps ``(B, Cs, Hs, Ws)`` → ``(B, Ct, Ht, Wt)``: resize to ``Ht × Wt`` (adaptive
  average pooling when the student map is larger, bilinear interpolation when smaller),
  then a 1×1 convolution + BatchNorm (RepDistiller's ``ConvReg`` minus the ReLU, so the
  adapter can match teacher features of either sign);
- vectors or sequences ``(..., Ds)`` → ``(..., Dt)``: a linear layer;
- anything ``(B, ...)`` → vectors ``(B, Dt)``: flatten, then a linear layer (e.g. a pooled
  ``(B, C, 1, 1)`` student feature against a teacher's penultimate ``(B, D)``).

Adapters are trained with the student, saved in its checkpoints (they are submodules of the
distiller's terms) and left out of the exported student.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Resize2d(nn.Module):
    """Resize ``(B, C, H, W)`` feature maps to a fixed spatial size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if (h, w) == self.size:
            return x
        if h >= self.size[0] and w >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def make_adapter(
    student_shape: torch.Size | tuple[int, ...], teacher_shape: torch.Size | tuple[int, ...]
) -> nn.Module:
    """An adapter taking tensors of ``student_shape`` to ``teacher_shape`` (batch dim first).

    Raises:
        ValueError: when no adapter kind fits (different ranks other than the cases above).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) == 4 and len(t) == 4:
        layers: list[nn.Module] = []
        if s[2:] != t[2:]:
            layers.append(Resize2d((t[2], t[3])))
        layers += [nn.Conv2d(s[1], t[1], kernel_size=1, bias=False), nn.BatchNorm2d(t[1])]
        return nn.Sequential(*layers)
    if len(s) == len(t) and len(s) >= 2 and s[:-1] == t[:-1]:
        return nn.Linear(s[-1], t[-1])
    if len(t) == 2 and len(s) > 2:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s[1:]), t[1]))
    raise ValueError(
        f"no automatic adapter from student shape {s} to teacher shape {t}; tap layers of "
        "the same rank (e.g. both feature maps, or both vectors), or give the term an "
        "adapter module yourself"
    )
