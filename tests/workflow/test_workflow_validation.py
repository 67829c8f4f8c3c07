"""``data.val_size``: a run trains on the rest of the training set and reports validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.config import ConfigError, config_from_dict
from kdistill.data import load_fashion_mnist, train_val_indices
from kdistill.experiment import load_data, load_validation, run_experiment


def _cfg(tmp_path: Path, tiny_overrides: list[str], **data: object) -> object:
    del tiny_overrides  # only for the skip when Fashion-MNIST is missing
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
            "data": {"test_subset": 128, "batch_size": 64, **data},
            "train": {"epochs": 2, "progress": False, "tensorboard": False},
        }
    )


def test_validation_images_are_held_out_of_training_and_test_is_untouched(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    cfg = _cfg(tmp_path, tiny_overrides, val_size=500, train_subset=1000)
    (train_x, _), (test_x, _) = load_data(cfg)
    val_x, val_y = load_validation(cfg)
    assert train_x.shape[0] == 1000 and val_x.shape[0] == 500
    # no validation image is a training image (rows compared as bytes)
    train_rows = {bytes(row.numpy()) for row in train_x.flatten(1)}
    assert not any(bytes(row.numpy()) in train_rows for row in val_x.flatten(1))
    assert torch.bincount(val_y, minlength=10).tolist() == [50] * 10  # stratified
    plain = _cfg(tmp_path, tiny_overrides, train_subset=1000)
    assert torch.equal(load_data(plain)[1][0], test_x)
    # the same validation images for every seed
    _, labels = load_fashion_mnist("train", None)
    _, val_idx = train_val_indices(labels, 500)
    assert torch.equal(val_y, labels[val_idx])
    other = _cfg(tmp_path, tiny_overrides, val_size=500, train_subset=1000)
    other.seed = 3
    assert torch.equal(load_validation(other)[0], val_x)
    assert load_validation(plain) is None


def test_run_reports_validation_per_epoch_and_in_the_summary(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    cfg = _cfg(tmp_path, tiny_overrides, val_size=200, train_subset=256)
    result = run_experiment(cfg)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in rows)
    student = json.loads((tmp_path / "run" / "summary.json").read_text())["student"]
    assert (
        student["val_accuracy"]
        == rows[-1]["val_accuracy"]
        == result.summary["student"]["val_accuracy"]
    )
    assert student["best_val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert student["val_samples"] == 200
    # val accuracy is the accuracy of the saved student on the validation images
    from kdistill.checkpoint import load_weights
    from kdistill.experiment import load_model

    model = load_model(cfg.student)
    model.load_state_dict(load_weights(result.fit.student_path))
    val_x, val_y = load_validation(cfg)
    with torch.no_grad():
        accuracy = (model(val_x).argmax(-1) == val_y).float().mean().item()
    assert accuracy == pytest.approx(student["val_accuracy"])


def test_a_validation_split_larger_than_the_training_set_names_the_key(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    with pytest.raises(ConfigError, match=r"data\.val_size: validation size must be between"):
        load_data(_cfg(tmp_path, tiny_overrides, val_size=60000))
    with pytest.raises(ConfigError, match=r"data\.train_subset: .* left after data\.val_size"):
        load_data(_cfg(tmp_path, tiny_overrides, val_size=10000, train_subset=55000))
    with pytest.raises(ConfigError, match=r"data\.val_size: must be > 0"):
        _cfg(tmp_path, tiny_overrides, val_size=0)
