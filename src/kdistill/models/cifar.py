"""The CIFAR-100 teachers and students of RepDistiller / CRD, for 32×32 RGB images.

Re-written plainly from RepDistiller (github.com/HobbitLong/RepDistiller, ``models/``),
the code behind "Contrastive Representation Distillation" (Tian et al., ICLR 2020), whose
CIFAR-100 table most distillation papers compare against. Architectures, initialisation
and parameter counts match RepDistiller, and so do the ``state_dict`` keys: its released
teacher checkpoints (``{"model": state_dict}`` ``.pth`` files) load into these modules
once converted to safetensors.

- ResNet for CIFAR (He et al., 2016, §4.2): :func:`resnet20`, :func:`resnet56` (widths
  16-16-32-64) and RepDistiller's 4× wider :func:`resnet8x4`, :func:`resnet32x4` (widths
  32-64-128-256); post-activation basic blocks.
- Wide ResNet (Zagoruyko & Komodakis, 2016): :func:`wrn_16_2`, :func:`wrn_40_2`;
  pre-activation blocks, no dropout.
- VGG with batch norm, RepDistiller's CIFAR variant (one linear classifier, no FC stack):
  :func:`vgg8` (config "S") and :func:`vgg13` (config "B").

``forward`` returns logits only. Feature distillation reads inner layers through forward
hooks (:class:`kdistill.taps.FeatureTaps`) by module name. The useful names, with their
outputs on a ``(B, 3, 32, 32)`` input (``w`` = 16-16-32-64 for resnet20/56, 32-64-128-256
for the ×4 ResNets, ``k`` = widen factor):

=========  ===========  ==========================================================
model      name         output
=========  ===========  ==========================================================
ResNet     ``relu``     stem, ``(B, w0, 32, 32)``
ResNet     ``layer1``   ``(B, w1, 32, 32)``, after the last block's ReLU
ResNet     ``layer2``   ``(B, w2, 16, 16)``
ResNet     ``layer3``   ``(B, w3, 8, 8)`` — the usual FitNet / CRD "last feature"
ResNet     ``avgpool``  ``(B, w3, 1, 1)``
WRN        ``conv1``    stem, ``(B, 16, 32, 32)``
WRN        ``block1``   ``(B, 16k, 32, 32)``, pre-activation (the block's raw sum)
WRN        ``block2``   ``(B, 32k, 16, 16)``
WRN        ``block3``   ``(B, 64k, 8, 8)``
WRN        ``relu``     ``(B, 64k, 8, 8)``, ``block3`` after the final BN + ReLU
VGG        ``block0``   ``(B, 64, 32, 32)``, after ReLU
VGG        ``block1``   ``(B, 128, 16, 16)``
VGG        ``block2``   ``(B, 256, 8, 8)``
VGG        ``block3``   ``(B, 512, 4, 4)``
VGG        ``block4``   ``(B, 512, 4, 4)``
VGG        ``pool4``    ``(B, 512, 1, 1)``
=========  ===========  ==========================================================

These are RepDistiller's ``is_feat=True`` features f0…f4 (its ``get_feat_modules``).
Its ``preact=True`` variants, taken before the final ReLU of a stage, are module outputs
for VGG (the stage's last BatchNorm: ``blockN.1`` in vgg8, ``blockN.4`` in vgg13) and for
WRN (the next BatchNorm: ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``); for the
ResNets the pre-ReLU residual sum is not the output of any module. No ReLU works in place,
so a tap on any submodule sees that module's true output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "CIFAR_MODELS",
    "VGG_CONFIGS",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "WideBlock",
    "WideResNet",
    "WideStage",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet56",
    "vgg8",
    "vgg13",
    "wrn_16_2",
    "wrn_40_2",
]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution, same padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# -- ResNet ---------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1×1 convolution + BatchNorm (``downsample``)
    when the shape changes (He et al.'s option B, as in torchvision and RepDistiller).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, C_out, H / s, W / s)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: a 3×3 stem, three stages of basic blocks, global pooling.

    ``depth = 6n + 2``: each stage holds ``n`` blocks of two convolutions; stages 2 and 3
    halve the resolution (32 → 16 → 8). ``widths`` are the stem's and the three stages'
    channels. RepDistiller: ``models/resnet.py``.
    """

    def __init__(
        self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (8, 20, 32, 56, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be 4 numbers (stem, stage 1-3), got {list(widths)}")
        n = (depth - 2) // 6
        w0, w1, w2, w3 = widths
        self.conv1 = conv3x3(3, w0)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(w0, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, 32, 32)
        x = self.layer1(x)  # (B, w1, 32, 32)
        x = self.layer2(x)  # (B, w2, 16, 16)
        x = self.layer3(x)  # (B, w3, 8, 8)
        x = self.avgpool(x).flatten(1)  # (B, w3)
        return self.fc(x)  # (B, num_classes)


# -- Wide ResNet ----------------------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation residual block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    When the shape changes the shortcut is a strided 1×1 convolution of the
    *pre-activated* input ``relu(bn1(x))``, otherwise the identity on ``x`` — exactly as
    in the WRN reference code and RepDistiller's ``models/wrn.py`` (whose attribute name
    ``convShortcut`` is kept so its checkpoints load).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.convShortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(
                in_channels, out_channels, 1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))  # (B, C_in, H, W)
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))  # (B, C_out, H / s, W / s)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class WideStage(nn.Module):
    """``n`` wide blocks in a row, the first one changing width and stride.

    A thin wrapper (RepDistiller's ``NetworkBlock``) so that parameter names read
    ``block1.layer.0.conv1.weight`` as in RepDistiller's checkpoints.
    """

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        layers = [WideBlock(in_channels, out_channels, stride)]
        layers += [WideBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32×32 inputs (Zagoruyko & Komodakis, 2016).

    ``depth = 6n + 4``: a 3×3 stem, three stages of ``n`` pre-activation blocks with
    ``16k``, ``32k``, ``64k`` channels (stages 2 and 3 halve the resolution), then
    BatchNorm + ReLU, global pooling and a linear classifier. RepDistiller: ``models/wrn.py``.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 (10, 16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], stride=1)
        self.block2 = WideStage(n, widths[1], widths[2], stride=2)
        self.block3 = WideStage(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, 16, 32, 32)
        x = self.block1(x)  # (B, 16k, 32, 32)
        x = self.block2(x)  # (B, 32k, 16, 16)
        x = self.block3(x)  # (B, 64k, 8, 8)
        x = self.relu(self.bn1(x))
        x = self.avgpool(x).flatten(1)  # (B, 64k)
        return self.fc(x)  # (B, num_classes)


# -- VGG ------------------------------------------------------------------------

# RepDistiller's ``models/vgg.py`` configurations: output channels of the 3×3
# convolutions in each of the five blocks.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),  # vgg8
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # vgg13
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32×32 inputs, RepDistiller's variant.

    Five blocks of (3×3 conv with bias → BatchNorm → ReLU) × k; 2×2 max-pooling after
    blocks 0-2 (32 → 16 → 8 → 4), blocks 3 and 4 both at 4×4, then global average
    pooling and a single linear classifier. RepDistiller: ``models/vgg.py`` (``vgg8_bn``,
    ``vgg13_bn``). ``pool3`` only runs on 64×64 inputs, as there.
    """

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        if len(config) != 5:
            raise ValueError(f"config must list 5 blocks of channel counts, got {len(config)}")
        in_channels = [3] + [block[-1] for block in config[:-1]]
        self.block0 = self._block(in_channels[0], config[0])
        self.block1 = self._block(in_channels[1], config[1])
        self.block2 = self._block(in_channels[2], config[2])
        self.block3 = self._block(in_channels[3], config[3])
        self.block4 = self._block(in_channels[4], config[4])
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[-1][-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None  # VGG's convolutions keep their bias
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _block(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
        """conv → BN → ReLU per entry; parameter indices (0, 1, 3, 4, ...) match RepDistiller."""
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        x = self.pool0(self.block0(x))  # (B, 64, 16, 16)
        x = self.pool1(self.block1(x))  # (B, 128, 8, 8)
        x = self.pool2(self.block2(x))  # (B, 256, 4, 4)
        x = self.block3(x)  # (B, 512, 4, 4)
        if height == 64:  # RepDistiller pools here only for 64×64 inputs (Tiny ImageNet)
            x = self.pool3(x)
        x = self.block4(x)  # (B, 512, 4, 4)
        x = self.pool4(x).flatten(1)  # (B, 512)
        return self.classifier(x)  # (B, num_classes)


# -- factories (RepDistiller's names) -------------------------------------------


def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20, 0.28 M parameters; RepDistiller's student of resnet56."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56, 0.86 M parameters; RepDistiller's teacher of resnet20."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 with 4× widths, 1.23 M parameters; RepDistiller's student of resnet32x4."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with 4× widths, 7.43 M parameters; RepDistiller's strongest teacher."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2, 0.70 M parameters; RepDistiller's student of wrn_40_2."""
    return WideResNet(16, 2, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2, 2.26 M parameters; RepDistiller's teacher of wrn_16_2."""
    return WideResNet(40, 2, num_classes)


def vgg8(num_classes: int = 100) -> CifarVGG:
    """VGG-8 with BatchNorm (config "S"), 3.96 M parameters; student of vgg13."""
    return CifarVGG(VGG_CONFIGS["S"], num_classes)


def vgg13(num_classes: int = 100) -> CifarVGG:
    """VGG-13 with BatchNorm (config "B"), 9.46 M parameters; RepDistiller's teacher."""
    return CifarVGG(VGG_CONFIGS["B"], num_classes)


CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
}
