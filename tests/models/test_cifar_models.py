from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.models import count_parameters
from kdistill.models.cifar import CIFAR_MODELS, CifarResNet, WideResNet, resnet8x4, wrn_16_2
from kdistill.taps import FeatureTaps

# Parameter counts for 100 classes reported by RepDistiller / the CRD paper (Tian et al. 2020).
REFERENCE_PARAMS = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "resnet20": 0.28e6,
    "resnet56": 0.86e6,
    "wrn_16_2": 0.70e6,
    "wrn_40_2": 2.26e6,
    "vgg8": 3.96e6,
    "vgg13": 9.46e6,
}

# Feature taps documented in kdistill.models.cifar, with their shapes on a 32×32 input.
TAPS = {
    "resnet20": {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)},
    "resnet56": {"layer3": (64, 8, 8)},
    "resnet8x4": {"relu": (32, 32, 32), "layer1": (64, 32, 32), "layer3": (256, 8, 8)},
    "resnet32x4": {"layer2": (128, 16, 16), "layer3": (256, 8, 8)},
    "wrn_16_2": {"conv1": (16, 32, 32), "block1": (32, 32, 32), "block3": (128, 8, 8)},
    "wrn_40_2": {"block2": (64, 16, 16), "block3": (128, 8, 8), "relu": (128, 8, 8)},
    "vgg8": {"block0": (64, 32, 32), "block2": (256, 8, 8), "block4": (512, 4, 4)},
    "vgg13": {"block1": (128, 16, 16), "block3": (512, 4, 4), "block4.4": (512, 4, 4)},
}


def test_registry_lists_every_model() -> None:
    assert set(CIFAR_MODELS) == set(REFERENCE_PARAMS) == set(TAPS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_repdistiller(name: str) -> None:
    count = count_parameters(CIFAR_MODELS[name](num_classes=100))
    assert count == pytest.approx(REFERENCE_PARAMS[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_logits_and_feature_taps(name: str) -> None:
    model = CIFAR_MODELS[name](num_classes=100).eval()
    with torch.no_grad(), FeatureTaps(model, list(TAPS[name])) as taps:
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    for tap, shape in TAPS[name].items():
        assert taps[tap].shape == (2, *shape), tap


def test_num_classes_and_train_step() -> None:
    model = resnet8x4(num_classes=10)
    logits = model(torch.randn(2, 3, 32, 32))  # train mode: BatchNorm uses batch statistics
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_taps_see_outputs_unchanged_by_later_layers() -> None:
    # No in-place ReLU: the last BatchNorm of vgg8's block1 keeps its negative values.
    model = CIFAR_MODELS["vgg8"]().eval()
    with torch.no_grad(), FeatureTaps(model, ["block1.1", "block1"]) as taps:
        model(torch.randn(2, 3, 32, 32))
    assert (taps["block1.1"] < 0).any()
    torch.testing.assert_close(taps["block1"], taps["block1.1"].relu())


def test_state_dict_keys_follow_repdistiller() -> None:
    """Key names of RepDistiller's checkpoints, so its released teachers can be loaded."""
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var"} <= set(
        resnet8x4().state_dict()
    )
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.1.bn1.weight", "fc.bias"} <= set(
        wrn_16_2().state_dict()
    )
    assert {
        "block0.0.bias",
        "block1.1.running_mean",
        "block4.4.weight",
        "classifier.weight",
    } <= set(CIFAR_MODELS["vgg13"]().state_dict())


def test_bad_depths() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(15, 2)
