"""Built-in teachers and students, and ``build_model`` for names used in configs."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.models.cifar import CIFAR_MODELS
from kdistill.models.cnn import MLP, SmallCNN, TeacherCNN
from kdistill.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
MODELS.add("teacher_cnn", TeacherCNN)
MODELS.add("small_cnn", SmallCNN)
MODELS.add("mlp", MLP)
for _name, _factory in CIFAR_MODELS.items():  # RepDistiller's CIFAR teachers and students
    MODELS.add(_name, _factory)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model (``small_cnn``) or a user one (``my_pkg.models:build``)."""
    model = MODELS.build(name, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; a shared/tied tensor once) — "model size"."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["MLP", "MODELS", "SmallCNN", "TeacherCNN", "build_model", "count_parameters"]
