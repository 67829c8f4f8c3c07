"""Torn checkpoints: a save killed at any write or rename leaves the previous one usable.

A checkpoint counts only once its ``COMPLETE`` marker (written last, after fsync of the
data files and the folder rename) exists; resume takes the newest complete folder, whatever
the ``latest`` pointer says, and the next save removes the debris. Corrupted or truncated
files are caught by the checksums in the marker, with an error naming the file.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_tiny import STEPS_PER_EPOCH, assert_same_weights, student_state, trainer

import kdistill.checkpoint as checkpoint
from kdistill.checkpoint import (
    COMPLETE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kdistill.trainer import ResumeError


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"student.w": torch.full((4, 3), value), "terms.0.b": torch.arange(3.0) * value}


def state(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "torch_rng": torch.get_rng_state(), "history": "[]"}


def _target(name: str, args: tuple[Any, ...]) -> Path:
    """The file a write call writes to."""
    return Path(args[0] if name == "Path.write_text" else args[1])


@contextmanager
def killed_at(monkeypatch: pytest.MonkeyPatch, n: int, events: list[str]) -> Iterator[None]:
    """Record each write / fsync / rename of a save; 'kill' the process at event ``n``.

    A kill at a write leaves half the file behind (a torn write). As after a real kill, no
    clean-up runs: ``shutil.rmtree`` and ``Path.unlink`` do nothing meanwhile.
    """
    counter = itertools.count()

    def wrap(name: str, fn: Callable[..., Any], writes: bool = False) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            index = next(counter)
            events.append(name)
            if index != n:
                return fn(*args, **kwargs)
            if writes:
                fn(*args, **kwargs)
                path = _target(name, args)
                with open(path, "r+b") as handle:
                    handle.truncate(path.stat().st_size // 2)
            raise Killed(f"killed at event {index}: {name}")

        return wrapper

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", wrap("save_file", checkpoint.save_file, True))
        m.setattr(torch, "save", wrap("torch.save", torch.save, True))
        m.setattr(Path, "write_text", wrap("Path.write_text", Path.write_text, True))
        m.setattr(os, "replace", wrap("os.replace", os.replace))
        m.setattr(os, "fsync", wrap("os.fsync", os.fsync))
        m.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
        m.setattr(Path, "unlink", lambda self, missing_ok=False: None)
        yield


def _prepare(directory: Path, scenario: str) -> None:
    """A complete epoch 1; for "overwrite-torn" also the debris of a torn save of epoch 2."""
    save_checkpoint(directory, 1, weights(1.0), state(1))
    if scenario == "overwrite-torn":
        torn = directory / "epoch-0002"
        torn.mkdir()
        (torn / "model.safetensors").write_bytes(b"half a file")


@pytest.mark.parametrize("scenario", ["new", "overwrite-torn"])
def test_a_save_killed_at_any_write_or_rename_leaves_the_previous_checkpoint_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: durability is not tested here
    events: list[str] = []
    _prepare(tmp_path / "probe", scenario)
    with killed_at(monkeypatch, -1, events):
        save_checkpoint(tmp_path / "probe", 2, weights(2.0), state(2))
    assert {"save_file", "torch.save", "Path.write_text", "os.replace", "os.fsync"} <= set(events)
    # The save is committed by the rename that puts COMPLETE in place (the first write_text).
    commit = events.index("os.replace", events.index("Path.write_text"))

    for n in range(len(events)):
        directory = tmp_path / f"kill-{n}"
        _prepare(directory, scenario)
        seen: list[str] = []
        with pytest.raises(Killed), killed_at(monkeypatch, n, seen):
            save_checkpoint(directory, 2, weights(2.0), state(2))
        assert seen == events[: n + 1]

        expected = 2 if n > commit else 1
        folder = latest_checkpoint(directory)
        assert folder == directory / f"epoch-000{expected}", (n, seen[-1])
        loaded, loaded_state = load_checkpoint(folder)  # checksums verified
        assert torch.equal(loaded["student.w"], weights(expected)["student.w"])
        assert loaded_state["epoch"] == expected

        # No manual clean-up: the next save works and removes the debris of the killed one.
        save_checkpoint(directory, 3, weights(3.0), state(3), keep_last=2)
        assert sorted(p.name for p in directory.iterdir()) == [
            f"epoch-000{expected}",
            "epoch-0003",
            "latest",
        ], (n, seen[-1])


def test_resume_after_a_save_killed_before_its_marker_continues_from_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trainer level: the mid-epoch save at step 4 dies before COMPLETE; resume from step 2."""
    full = trainer(tmp_path / "full", checkpoint_every=2)
    full.fit()

    crashing = trainer(tmp_path / "run", checkpoint_every=2)
    real = checkpoint.atomic_write_text

    def die_before_marker(path: Any, text: str) -> Path:
        if Path(path).name == COMPLETE and "epoch-0000-step-000004" in str(path):
            raise Killed("killed before the marker")
        return real(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", die_before_marker)
    with pytest.raises(Killed):
        crashing.fit()
    monkeypatch.undo()
    assert (tmp_path / "run/checkpoints/epoch-0000-step-000004/model.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "run/checkpoints") == (
        tmp_path / "run/checkpoints/epoch-0000-step-000002"
    )

    resumed = trainer(tmp_path / "run", checkpoint_every=2, student_seed=5)
    with pytest.warns(UserWarning, match="epoch-0000-step-000004"):  # the torn one is named
        resumed.fit(resume=True)
    assert_same_weights(student_state(resumed), student_state(full))
    steps = (tmp_path / "run/steps.jsonl").read_text()
    assert steps == (tmp_path / "full/steps.jsonl").read_text()
    assert len(steps.splitlines()) == 2 * STEPS_PER_EPOCH


def test_the_latest_pointer_is_only_a_hint(tmp_path: Path) -> None:
    for epoch in (1, 2):
        save_checkpoint(tmp_path, epoch, weights(epoch), state(epoch))
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0002"
    (tmp_path / "latest").write_text(json.dumps({"epoch": 9, "path": "epoch-0009"}))
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0002"


def test_mid_epoch_checkpoints_sort_between_their_epochs(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, weights(1.0), state(1), keep_last=5)
    save_checkpoint(tmp_path, 1, weights(1.5), state(1), keep_last=5, step=40)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0001-step-000040"
    save_checkpoint(tmp_path, 2, weights(2.0), state(2), keep_last=5)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0002"


# -- corruption ----------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 7)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_a_corrupted_or_truncated_file_is_an_error_naming_it(
    tmp_path: Path, damage: Callable[[Path], None], name: str
) -> None:
    folder = save_checkpoint(tmp_path, 1, weights(1.0), state(1))
    damage(folder / name)
    with pytest.raises(CheckpointError, match=rf"epoch-0001/{name}: (corrupted|truncated)"):
        load_checkpoint(folder)


def test_a_damaged_completion_marker_is_an_error_naming_it(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, 1, weights(1.0), state(1))
    (folder / COMPLETE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"epoch-0001/{COMPLETE}: unreadable"):
        load_checkpoint(folder)


def test_resume_from_a_corrupted_checkpoint_fails_naming_the_file_and_the_fallback(
    tmp_path: Path,
) -> None:
    """Decision: an error, not a silent fall-back; the message says which folder to delete."""
    trainer(tmp_path, epochs=2).fit()
    _flip_byte(tmp_path / "checkpoints/epoch-0002/model.safetensors")
    with pytest.raises(ResumeError) as info:
        trainer(tmp_path, epochs=2).fit(resume=True)
    message = str(info.value)
    assert "epoch-0002/model.safetensors: corrupted" in message
    assert "previous complete checkpoint epoch-0001" in message

    shutil.rmtree(tmp_path / "checkpoints/epoch-0002")  # what the message says to do
    result = trainer(tmp_path, epochs=2).fit(resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_checkpoints_of_an_earlier_longer_run_are_replaced_not_resumed(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, weights(epoch), state(epoch), keep_last=5)
    save_checkpoint(tmp_path, 1, weights(10.0), state(1), keep_last=5)  # a new run's first
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0001"


def test_a_fresh_fit_over_old_checkpoints_says_it_replaces_them(tmp_path: Path) -> None:
    trainer(tmp_path, epochs=2).fit()
    with pytest.warns(UserWarning, match="checkpoints of an earlier run"):
        trainer(tmp_path, epochs=1).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*")) == ["epoch-0001"]
