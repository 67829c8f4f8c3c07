"""Every YAML config that ships with kdistill parses and names models and losses that exist."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.experiment import build_terms
from kdistill.models import MODELS

CONFIGS = sorted(Path(str(resources.files("kdistill") / "configs")).rglob("*.yaml"))


def test_configs_are_packaged() -> None:
    names = {p.name for p in CONFIGS}
    assert {"fashion_mnist_demo.yaml", "fashion_mnist_teacher.yaml"} <= names
    assert any(p.parent.name == "cifar100" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_packaged_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.student.model in MODELS
    if cfg.teacher is not None:
        assert cfg.teacher.model in MODELS
    assert build_terms(cfg.distill, cfg.teacher is not None)
