"""End-to-end runs on a small Fashion-MNIST subset (skipped when the data is not installed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from kdistill.config import ConfigError, ExperimentConfig, config_from_dict
from kdistill.data import DatasetNotFoundError, find_fashion_mnist
from kdistill.experiment import run_experiment

try:
    find_fashion_mnist()
except DatasetNotFoundError:
    pytest.skip("Fashion-MNIST is not installed", allow_module_level=True)


@pytest.fixture(autouse=True)
def _restore_torch_determinism() -> Iterator[None]:
    """run_experiment switches on deterministic algorithms globally; undo that afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def tiny_config(output_dir: Path, **distill: Any) -> ExperimentConfig:
    return config_from_dict(
        {
            "seed": 0,
            "output_dir": str(output_dir),
            "data": {"train_subset": 512, "test_subset": 256, "batch_size": 64},
            "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}},
            "student": {"model": "mlp", "kwargs": {"hidden": [32]}},
            "distill": {
                **({} if "terms" in distill else {"temperature": 4.0, "alpha": 0.5}),
                **distill,
            },
            "optim": {"name": "adamw", "lr": 0.01, "schedule": "constant"},
            "train": {"epochs": 2, "progress": False},
        }
    )


@pytest.mark.parametrize("cache_teacher", [True, False], ids=["cached", "live"])
def test_tiny_run_trains_and_writes_a_summary(tmp_path: Path, cache_teacher: bool) -> None:
    cfg = tiny_config(tmp_path, cache_teacher=cache_teacher)
    result = run_experiment(cfg)

    history = result.fit.history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0]["train_loss"] > history[-1]["train_loss"]
    assert {"train_kd_loss", "train_ce_loss"} <= set(history[-1])

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_samples"] == 512
    assert summary["epochs"] == 2
    assert summary["student"]["model"] == "mlp"
    assert summary["student"]["parameters"] == 784 * 32 + 32 + 32 * 10 + 10
    assert summary["teacher"]["parameters"] == 784 * 64 + 64 + 64 * 10 + 10
    assert [t["name"] for t in summary["terms"]] == ["kd", "ce"]
    assert summary["config"]["distill"]["cache_teacher"] is cache_teacher
    assert Path(summary["student"]["weights"]).is_file()
    assert (tmp_path / "metrics.csv").is_file()


def test_cached_and_live_teacher_train_the_same_student(tmp_path: Path) -> None:
    cached = run_experiment(tiny_config(tmp_path / "cached", cache_teacher=True))
    live = run_experiment(tiny_config(tmp_path / "live", cache_teacher=False))
    for a, b in zip(cached.fit.history, live.fit.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_alpha_zero_trains_on_labels_only(tmp_path: Path) -> None:
    result = run_experiment(tiny_config(tmp_path, alpha=0.0))
    assert [t["name"] for t in result.summary["terms"]] == ["ce"]
    assert "train_kd_loss" not in result.fit.final


def test_cache_teacher_with_augmentation_raises_value_error_naming_both_keys(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(tmp_path, cache_teacher=True)
    cfg.data.augment = True
    with pytest.raises(ValueError, match="cache_teacher") as info:
        run_experiment(cfg)
    assert "data.augment" in str(info.value)
    assert "distill.cache_teacher" in str(info.value)


def test_hinton_keys_next_to_terms_are_refused_not_ignored(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, terms=[{"name": "ce", "loss": "cross_entropy", "teacher": None}])
    cfg = config_from_dict({**cfg.to_dict(), "distill": {**cfg.to_dict()["distill"]}})
    with pytest.raises(ConfigError, match=r"distill\.alpha: has no effect when distill\.terms"):
        run_experiment(cfg)


def test_cached_teacher_layers_train_like_the_live_teacher(tmp_path: Path) -> None:
    # net.2 is the ReLU after the first linear layer: (B, 32) student vs (B, 64) teacher,
    # so the hint term gets an automatic Linear(32, 64) adapter.
    terms = [
        {"name": "hint", "loss": "hint", "student": "net.2", "teacher": "net.2"},
        {"name": "ce", "loss": "cross_entropy", "teacher": None},
    ]
    cached = run_experiment(tiny_config(tmp_path / "cached", cache_teacher=True, terms=terms))
    live = run_experiment(tiny_config(tmp_path / "live", cache_teacher=False, terms=terms))
    for a, b in zip(cached.fit.history, live.fit.history, strict=True):
        assert a["train_hint_loss"] == pytest.approx(b["train_hint_loss"], rel=1e-4)
    weights = safetensors.torch.load_file(
        str(tmp_path / "cached" / "checkpoints" / "epoch-0002" / "model.safetensors")
    )
    assert weights["terms.0.adapter.weight"].shape == (64, 32)


def test_unknown_layer_in_a_term_is_a_config_error_listing_close_names(tmp_path: Path) -> None:
    terms = [{"name": "hint", "loss": "hint", "student": "net.7", "teacher": "net.2"}]
    with pytest.raises(ConfigError, match=r"distill\.terms.*net\.7.*closest"):
        run_experiment(tiny_config(tmp_path, terms=terms))
