"""Loss names usable in configs (``loss: kd``) mapped to module factories."""

from __future__ import annotations

from torch import nn

from kdistill.losses.attention import AttentionTransferLoss
from kdistill.losses.correlation import CorrelationCongruenceLoss
from kdistill.losses.cosine import CosineLoss
from kdistill.losses.crd import CRDLoss
from kdistill.losses.dist import DISTLoss
from kdistill.losses.dkd import DKDLoss
from kdistill.losses.fitnets import HintLoss
from kdistill.losses.kd import KDLoss
from kdistill.losses.label_smoothing import LabelSmoothingCrossEntropy
from kdistill.losses.pkt import PKTLoss
from kdistill.losses.rkd import RKDLoss
from kdistill.losses.similarity import SimilarityPreservingLoss
from kdistill.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")
LOSSES.add("kd", KDLoss)
LOSSES.add("cross_entropy", lambda: LabelSmoothingCrossEntropy(smoothing=0.0))
LOSSES.add("label_smoothing", LabelSmoothingCrossEntropy)
LOSSES.add("hint", HintLoss)  # FitNets
LOSSES.add("mse", HintLoss)
LOSSES.add("attention", AttentionTransferLoss)
LOSSES.add("cosine", CosineLoss)
LOSSES.add("rkd", RKDLoss)
LOSSES.add("sp", SimilarityPreservingLoss)
LOSSES.add("pkt", PKTLoss)
LOSSES.add("cc", CorrelationCongruenceLoss)
LOSSES.add("dkd", DKDLoss)
LOSSES.add("dist", DISTLoss)
LOSSES.add("crd", CRDLoss)
# LM token-level KD, chunked over tokens; imported on first use, so vision runs never load
# the language-model package
LOSSES.add("token_divergence", "kdistill.lm.divergences:TokenDivergenceLoss")
# dense prediction (detection / segmentation): kdistill.losses.dense
LOSSES.add("cwd", "kdistill.losses.dense:ChannelWiseDistillationLoss")
LOSSES.add("pkd", "kdistill.losses.dense:PearsonFeatureLoss")
LOSSES.add("pixel_kd", "kdistill.losses.dense:PixelKDLoss")
LOSSES.add("heatmap_kd", "kdistill.losses.dense:HeatmapKDLoss")
LOSSES.add("box_kd", "kdistill.losses.dense:BoxKDLoss")
