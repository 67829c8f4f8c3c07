"""A tiny project of a user's own: model classes, an image folder, ``.npz`` arrays, teachers.

``project`` is built once per session in a few seconds from Fashion-MNIST (60 PNG images, a
small ``.npz``) next to a copy of ``examples/own_data`` (its ``models.py`` and YAML files),
plus ``bad_models.py`` (a teacher whose outputs are NaN) and teacher weights that are fine,
truncated, or hold a NaN — what the error tests feed the command line.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import EXAMPLE, have_fashion_mnist

PER_CLASS = 6  # 60 images: seconds, not minutes

BAD_MODELS = '''
import torch
from torch import nn


class NaNTeacher(nn.Module):
    """Finite weights, NaN outputs (a log of a negative number)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(28 * 28, num_classes)

    def forward(self, x):
        return torch.log(-self.head(x.flatten(1)).abs() - 1.0)
'''

MY_DATA = '''
import numpy as np
import torch
from torch.utils.data import TensorDataset


def load(n: int = 40, seed: int = 0):
    """A factory: a torch Dataset for training, an (inputs, labels) pair of arrays for test."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8))
    y = torch.arange(n) % 10
    test = (rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    return {"train": TensorDataset(x, y), "test": test, "classes": [f"c{i}" for i in range(10)]}
'''


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``own_data/``: the example's files, ``images/``, ``arrays.npz``, ``bad_models.py`` and
    ``teacher_ok|teacher_truncated|teacher_nan.safetensors`` (an untrained ``models:Teacher``)."""
    if not have_fashion_mnist():
        pytest.skip("Fashion-MNIST not installed")
    root = tmp_path_factory.mktemp("cli") / "own_data"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("__pycache__", "images", "*.npz"))
    sys.path.insert(0, str(root))
    try:
        import make_data

        import models

        make_data.make_image_folder(root / "images", PER_CLASS)
        make_data.make_npz(root / "arrays.npz", PER_CLASS)
        torch.manual_seed(0)
        state = models.Teacher(in_channels=1, num_classes=10, width=32).state_dict()
    finally:
        sys.path.remove(str(root))
        for name in ("make_data", "models"):
            sys.modules.pop(name, None)
    from kdistill.checkpoint import save_weights

    save_weights(root / "teacher_ok.safetensors", state)
    data = (root / "teacher_ok.safetensors").read_bytes()
    (root / "teacher_truncated.safetensors").write_bytes(data[: len(data) // 2])
    broken = dict(state)
    broken["head.weight"] = broken["head.weight"].clone()
    broken["head.weight"][0, 0] = float("nan")
    save_weights(root / "teacher_nan.safetensors", broken)
    (root / "bad_models.py").write_text(BAD_MODELS)
    (root / "my_data.py").write_text(MY_DATA)
    return root
