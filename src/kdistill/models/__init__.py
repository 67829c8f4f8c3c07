"""Built-in teachers and students, and ``build_model`` for names used in configs."""

from __future__ import annotations

import sys
from pathlib import Path
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


def import_dirs(name: str) -> list[str]:
    """The folder from which ``package.module:Class`` imports (``[]`` for registry names and
    for modules installed in site-packages): what a later process must put on ``sys.path`` to
    rebuild the model, e.g. ``kdistill export`` / ``predict`` run from another folder."""
    if ":" not in name or name in MODELS:
        return []
    module_name = name.partition(":")[0]
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or "site-packages" in file or "dist-packages" in file:
        return []
    folder = Path(file).resolve().parent
    for _ in range(module_name.count(".") + (Path(file).name == "__init__.py")):
        folder = folder.parent
    return [str(folder)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; a shared/tied tensor once) — "model size"."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MLP",
    "MODELS",
    "SmallCNN",
    "TeacherCNN",
    "build_model",
    "count_parameters",
    "import_dirs",
]
