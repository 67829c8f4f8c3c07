from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import (
    atomic_write,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)


def weights(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"student.w": torch.full((2, 3), value), "terms.0.b": torch.arange(4.0)}


# -- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_atomic_write_leaves_the_old_file_intact_when_the_writer_raises(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("good")

    def half_write(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# -- weights files ---------------------------------------------------------------------------


def test_save_and_load_weights_round_trip(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.randn(4, 3).t(), "c": torch.arange(5)}
    path = save_weights(tmp_path / "w.safetensors", state)
    loaded = load_weights(path)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype


def test_load_weights_of_a_garbage_file_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_weights(path)


def test_load_weights_of_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_weights(tmp_path / "nope.safetensors")


# -- checkpoint folders ----------------------------------------------------------------------


def test_latest_checkpoint_of_an_empty_or_missing_dir_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None


def test_save_checkpoint_round_trips_weights_and_state(tmp_path: Path) -> None:
    state = {"epoch": 3, "history": json.dumps([{"loss": 0.5}]), "rng": torch.get_rng_state()}
    folder = save_checkpoint(tmp_path, 3, weights(2.0), state)
    assert folder == tmp_path / "epoch-0003"
    assert latest_checkpoint(tmp_path) == folder
    loaded_weights, loaded_state = load_checkpoint(folder)
    assert torch.equal(loaded_weights["student.w"], weights(2.0)["student.w"])
    assert loaded_state["epoch"] == 3 and json.loads(loaded_state["history"]) == [{"loss": 0.5}]
    assert torch.equal(loaded_state["rng"], state["rng"])


def test_save_checkpoint_keeps_only_the_last_folders(tmp_path: Path) -> None:
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch, weights(epoch), {"epoch": epoch}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["epoch-0004", "epoch-0005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0005"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_save_checkpoint_with_keep_last_one_keeps_the_newest(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, weights(epoch), {"epoch": epoch}, keep_last=1)
    assert [p.name for p in tmp_path.glob("epoch-*")] == ["epoch-0003"]


def test_saving_an_epoch_again_overwrites_its_folder(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, weights(1.0), {"epoch": 1})
    save_checkpoint(tmp_path, 1, weights(7.0), {"epoch": 1})
    loaded, _ = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert torch.equal(loaded["student.w"], weights(7.0)["student.w"])


def test_failed_checkpoint_write_keeps_the_previous_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, weights(1.0), {"epoch": 1})

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, weights(2.0), {"epoch": 2})
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0001"
    assert not (tmp_path / "epoch-0002").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_latest_pointing_at_an_incomplete_folder_is_file_not_found(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, 1, weights(), {"epoch": 1})
    (folder / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="epoch-0001"):
        latest_checkpoint(tmp_path)
