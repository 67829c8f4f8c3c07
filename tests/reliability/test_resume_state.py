"""Missing or mismatched state fails loudly: an error, or a warning naming harmless keys."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from reliability_tiny import STEPS_PER_EPOCH, config, trainer

from kdistill.callbacks import LambdaCallback
from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdistill.trainer import RESUMABLE_DIFFERENCES, ResumeError, ResumeWarning, Trainer


class Interrupted(Exception):
    pass


class StopMidEpoch(Trainer):
    """Raises right after the first mid-epoch checkpoint of the second epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callbacks.callbacks.append(LambdaCallback(on_checkpoint_saved=self._stop))

    def _stop(self, trainer: Trainer, epoch: int, step: int) -> None:
        if epoch == 1 and step:
            raise Interrupted


def _interrupted_run(tmp_path: Path, cfg: dict[str, Any] | None = None) -> Path:
    with pytest.raises(Interrupted):
        trainer(tmp_path, cfg=cfg, checkpoint_every=4, cls=StopMidEpoch).fit()
    folder = latest_checkpoint(tmp_path / "checkpoints")
    assert folder is not None and folder.name == "epoch-0001-step-000002"  # global step 8
    return folder


def _rewrite_state(folder: Path, drop: str) -> None:
    """Re-save the checkpoint without one state entry (with valid checksums)."""
    weights, state = load_checkpoint(folder)
    del state[drop]
    save_checkpoint(folder.parent, state["epoch"], weights, state, step=state["step"])


# -- missing state ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["optimizer", "scheduler", "torch_rng", "python_rng", "partial"])
def test_a_checkpoint_without_part_of_its_state_cannot_be_resumed(tmp_path: Path, key: str) -> None:
    folder = _interrupted_run(tmp_path)
    _rewrite_state(folder, key)
    resumed = trainer(tmp_path, checkpoint_every=4)
    with pytest.raises(ResumeError, match=rf"lacks \[.*'{key}"):
        resumed.fit(resume=True)


def test_weights_that_do_not_fit_the_student_are_a_resume_error_naming_the_file(
    tmp_path: Path,
) -> None:
    folder = _interrupted_run(tmp_path)
    weights, state = load_checkpoint(folder)
    del weights["student.0.weight"]
    save_checkpoint(folder.parent, state["epoch"], weights, state, step=state["step"])
    with pytest.raises(ResumeError, match=r"model\.safetensors does not fit") as info:
        trainer(tmp_path, checkpoint_every=4).fit(resume=True)
    assert "0.weight" in str(info.value)


def test_a_mid_epoch_resume_restores_the_partial_epoch(tmp_path: Path) -> None:
    full = trainer(tmp_path / "full", checkpoint_every=4).fit()
    _interrupted_run(tmp_path / "run")
    resumed = trainer(tmp_path / "run", checkpoint_every=4, student_seed=3).fit(resume=True)
    assert resumed.history[1]["train_loss"] == full.history[1]["train_loss"]
    assert resumed.history[1]["train_accuracy"] == full.history[1]["train_accuracy"]
    log = (tmp_path / "run/steps.jsonl").read_text().splitlines()
    assert len(log) == 2 * STEPS_PER_EPOCH
    assert log == (tmp_path / "full/steps.jsonl").read_text().splitlines()


# -- config differences ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("optim", "lr", 0.5),
        ("distill", "temperature", 8.0),
        ("data", "batch_size", 16),
        ("train", "deterministic", False),
        (None, "seed", 1),
    ],
)
def test_a_config_change_that_changes_training_is_an_error_naming_the_key(
    tmp_path: Path, section: str | None, key: str, value: Any
) -> None:
    _interrupted_run(tmp_path, cfg=config())
    changed = config()
    (changed[section] if section else changed)[key] = value
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(ResumeError, match=rf"{dotted}: .* -> {value!r}"):
        trainer(tmp_path, cfg=changed, checkpoint_every=4).fit(resume=True)


@pytest.mark.parametrize("dotted", RESUMABLE_DIFFERENCES)
def test_a_harmless_config_change_resumes_with_a_warning_naming_it(
    tmp_path: Path, dotted: str
) -> None:
    _interrupted_run(tmp_path, cfg=config())
    changed = config()
    *sections, key = dotted.split(".")
    node = changed
    for section in sections:
        node = node[section]
    node[key] = {"output_dir": "elsewhere", "progress": True, "device": "cpu:0"}.get(key, 3)
    with pytest.warns(ResumeWarning, match=rf"do not change training: {dotted}: "):
        result = trainer(tmp_path, cfg=changed, checkpoint_every=4).fit(resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_resume_with_the_same_config_is_silent(tmp_path: Path) -> None:
    _interrupted_run(tmp_path, cfg=config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tmp_path, cfg=config(), checkpoint_every=4).fit(resume=True)


def test_resume_without_a_config_to_compare_warns(tmp_path: Path) -> None:
    _interrupted_run(tmp_path, cfg=config())
    with pytest.warns(ResumeWarning, match="this run gives no config"):
        trainer(tmp_path, cfg=None, checkpoint_every=4).fit(resume=True)


def test_resume_with_a_different_steps_per_epoch_is_refused(tmp_path: Path) -> None:
    _interrupted_run(tmp_path)
    other = trainer(tmp_path, checkpoint_every=4)
    other.train_loader.batch_size = 12  # type: ignore[attr-defined]
    with pytest.raises(ResumeError, match="2 epochs of 6 steps, this run has 2 epochs of 4"):
        other.fit(resume=True)


# -- the config path ---------------------------------------------------------------------------


def test_run_experiment_passes_the_reliability_options_to_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import kdistill.experiment as experiment
    from kdistill.config import config_from_dict

    def fake_load_data(cfg: Any) -> Any:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        return (x, y), (x, y)

    monkeypatch.setattr(experiment, "load_data", fake_load_data)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
            "data": {"batch_size": 4},
            "train": {"epochs": 1, "progress": False, "checkpoint_every": 2, "skip_nonfinite": 1},
        }
    )
    try:
        result = experiment.run_experiment(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*"))
    assert names == ["epoch-0000-step-000002", "epoch-0001"]
    assert result.fit.final["skipped_steps"] == 0
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 4
