"""Loss names usable in configs (``loss: kd``) mapped to module factories."""

from __future__ import annotations

from torch import nn

from kdistill.losses.kd import KDLoss
from kdistill.losses.label_smoothing import LabelSmoothingCrossEntropy
from kdistill.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")
LOSSES.add("kd", KDLoss)
LOSSES.add("cross_entropy", lambda: LabelSmoothingCrossEntropy(smoothing=0.0))
LOSSES.add("label_smoothing", LabelSmoothingCrossEntropy)
LOSSES.add("mse", nn.MSELoss)
