"""Plain convolutional teachers and students for 28×28 grey images (Fashion-MNIST, MNIST).

Nothing here knows about distillation: the distiller reads whatever it needs through
forward hooks (:mod:`kdistill.taps`), so these models are ordinary ``nn.Module`` s and any
user model can take their place.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 convolution (same padding) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TeacherCNN(nn.Module):
    """A VGG-style teacher, ≈ 0.9 M parameters, ≈ 94 % on Fashion-MNIST.

    Two stages of two 3×3 convolutions, each followed by 2×2 max-pooling, then a wide
    fully-connected head with dropout. Most parameters sit in ``head.fc1``; most compute in
    the convolutions.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width))
        self.stage2 = nn.Sequential(
            conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width)
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential()
        self.head.add_module("flatten", nn.Flatten())
        self.head.add_module("drop1", nn.Dropout(dropout))
        self.head.add_module("fc1", nn.Linear(2 * width * 7 * 7, hidden))
        self.head.add_module("relu", nn.ReLU(inplace=True))
        self.head.add_module("drop2", nn.Dropout(dropout))
        self.head.add_module("fc2", nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stage1(x))  # (B, w, 14, 14)
        x = self.pool(self.stage2(x))  # (B, 2w, 7, 7)
        return self.head(x)  # (B, num_classes)


class SmallCNN(nn.Module):
    """A compact student, ≈ 50 k parameters: four 3×3 convolutions and global pooling."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int, int, int] = (16, 32, 48, 64),
    ) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w1),
            nn.MaxPool2d(2),  # (B, w1, 14, 14)
            conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),  # (B, w2, 7, 7)
            conv_bn_relu(w2, w3),
            conv_bn_relu(w3, w4),  # (B, w4, 7, 7)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, w4)
        return self.fc(x)  # (B, num_classes)


class MLP(nn.Module):
    """A fully-connected student: flatten → hidden layers with ReLU → logits."""

    def __init__(
        self,
        in_features: int = 28 * 28,
        num_classes: int = 10,
        hidden: tuple[int, ...] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes)
