"""Your own teacher and student: any ``torch.nn.Module`` classes, named in the YAML as
``models:Teacher`` / ``models:Student`` (this file sits next to the configs, so it imports
without setting PYTHONPATH). Their constructor arguments come from ``kwargs:``.
"""

from __future__ import annotations

from torch import Tensor, nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Teacher(nn.Module):
    """Three conv blocks, global pooling, a linear head: ``(B, C, H, W) -> (B, num_classes)``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width), _block(width, 2 * width), _block(2 * width, 2 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))  # (B, num_classes)


class Student(nn.Module):
    """Two narrow conv blocks and a linear head: a few thousand parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, width), _block(width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))  # (B, num_classes)
