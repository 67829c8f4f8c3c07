"""Tiny synthetic data and models shared by the scheme tests."""

from __future__ import annotations

import torch
from torch import nn

DIM, CLASSES = 12, 4


def blobs(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (the same for every seed)."""
    centres = 3.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, DIM, generator=g), y


def mlp(hidden: int, classes: int = CLASSES) -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class TinyCNN(nn.Module):
    """(B, 1, 8, 8) images -> conv (B, 4, 8, 8) -> pool (B, 4, 4, 4) -> conv -> gap -> fc."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.pool(self.conv1(x)))
        return self.fc(self.gap(x).flatten(1))
