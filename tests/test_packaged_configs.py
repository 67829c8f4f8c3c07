"""Every YAML config that ships with kdistill parses and names models and losses that exist."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.experiment import build_terms, run_experiment
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


# Scheme examples (examples/schemes/) have their own runner and are run in tests/schemes/ and
# tests/test_run_path.py; LM examples (examples/lm/, `kdistill lm`) in tests/lm/; dense-task
# examples (examples/dense/) in tests/dense/test_run.py; the own-data example
# (examples/own_data/, data the test generates) in tests/cli/test_own_data.py.
EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml")
    if p.parent.name not in ("schemes", "lm", "dense", "own_data")
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_runs_end_to_end_on_a_small_subset(path: Path, tmp_path: Path) -> None:
    pytest.importorskip("kdistill.data").find_fashion_mnist()
    cfg = load_config(
        path,
        [
            "data.train_subset=256",
            "data.test_subset=128",
            "data.batch_size=64",
            "train.epochs=1",
            "train.progress=false",
            f"output_dir={tmp_path}",
        ],
    )
    result = run_experiment(cfg)
    assert 0.0 <= result.summary["student"]["test_accuracy"] <= 1.0
    for stage in cfg.stages:
        assert (tmp_path / stage.name / "student.safetensors").is_file()


def test_every_zoo_method_has_an_example_config() -> None:
    names = {p.stem for p in EXAMPLES if p.parent.name == "zoo"}
    assert names == {"kd", "fitnets", "at", "sp", "rkd", "pkt", "cc", "crd", "dkd", "dist"}
