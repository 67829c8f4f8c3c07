"""Atomic, verifiable checkpoints: a crash never leaves a half-written one that resume trusts.

A checkpoint is a folder in ``checkpoints/`` named by how far training had got:
``epoch-0003`` after three whole epochs, ``epoch-0003-step-000040`` after three epochs and
40 optimizer steps of the fourth (a mid-epoch checkpoint). It holds

- ``model.safetensors`` — student and adapter weights (never the frozen teacher),
- ``state.pt`` — optimizer, scheduler, position, RNG states and metric history,
- ``COMPLETE`` — the completion marker: JSON with the position and the size and sha256 of
  each data file.

A save writes each data file to a temporary name, fsyncs it and ``os.replace`` s it into a
staging folder; fsyncs the staging folder and renames it to its final name; and only then
writes ``COMPLETE`` (again temp + fsync + ``os.replace``), fsyncs the folder, and replaces the
``latest`` pointer. A folder without ``COMPLETE`` is therefore a save that was interrupted,
whatever else it holds.

:func:`latest_checkpoint` scans the folders and returns the newest *complete* one; the
``latest`` file is a hint for people and tools, not something resume depends on, so a kill
at any point of a save leaves the previous checkpoint usable with no manual clean-up (the
next save removes the debris). :func:`load_checkpoint` checks every file against the sizes
and checksums in ``COMPLETE`` and raises :class:`CheckpointError` naming the file that is
missing, truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
COMPLETE = "COMPLETE"
LATEST = "latest"
FORMAT = 1

_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One folder in a checkpoint directory, complete (has ``COMPLETE``) or not."""

    path: Path
    epoch: int  # whole epochs done
    step: int  # optimizer steps done within the next epoch (0 at an epoch boundary)
    complete: bool

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch-0003`` or, mid-epoch, ``epoch-0003-step-000040`` (sorts chronologically)."""
    return f"epoch-{epoch:04d}" if step == 0 else f"epoch-{epoch:04d}-step-{step:06d}"


# -- atomic files ----------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename to ``path``: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use normal permissions
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_weights(
    path: str | os.PathLike[str],
    state: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a state dict as safetensors atomically (tensors made contiguous, CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return atomic_write(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    )


def load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- checkpoint folders ----------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str],
    epoch: int,
    weights: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int = 2,
    step: int = 0,
) -> Path:
    """Write the checkpoint ``directory/<checkpoint_name(epoch, step)>``; returns its folder.

    Order: data files (temp + fsync + rename) in a staging folder → folder fsync → rename to
    the final name → ``COMPLETE`` (temp + fsync + rename) → ``latest`` pointer → pruning to
    the newest ``keep_last`` complete checkpoints (and removal of debris of interrupted
    saves).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(epoch, step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    trash = directory / f".{final.name}.old"
    try:
        save_weights(staging / MODEL_FILE, weights)
        atomic_write(staging / STATE_FILE, lambda tmp: torch.save(dict(state), tmp))
        files = {
            name: {"bytes": (staging / name).stat().st_size, "sha256": file_digest(staging / name)}
            for name in (MODEL_FILE, STATE_FILE)
        }
        if final.exists():  # saving a position again (e.g. after resuming before it)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(directory)
    marker = {"format": FORMAT, "epoch": epoch, "step": step, "files": files}
    atomic_write_text(final / COMPLETE, json.dumps(marker, indent=1) + "\n")
    _fsync_dir(directory)
    pointer = {"epoch": epoch, "step": step, "path": final.name}
    atomic_write_text(directory / LATEST, json.dumps(pointer) + "\n")
    _prune(directory, keep_last, keep=final.name)
    return final


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every checkpoint folder in ``directory``, oldest first, complete or not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            epoch, step = int(match[1]), int(match[2] or 0)
            found.append(CheckpointInfo(path, epoch, step, (path / COMPLETE).is_file()))
    return sorted(found, key=lambda info: info.position)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder in ``directory``, or ``None`` when there is none.

    Folders without ``COMPLETE`` (interrupted saves) are skipped; the ``latest`` pointer is
    not needed. Raises ``FileNotFoundError`` naming the file when a complete folder lacks a
    file its marker lists (someone deleted it).
    """
    complete = [info for info in list_checkpoints(directory) if info.complete]
    if not complete:
        return None
    folder = complete[-1].path
    for name in _read_marker(folder)["files"]:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"checkpoint {folder} is incomplete or damaged: {folder / name} is missing"
            )
    return folder


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check each file of ``folder`` against the size and sha256 in its ``COMPLETE`` marker."""
    folder = Path(folder)
    for name, expected in _read_marker(folder)["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {folder / COMPLETE})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: truncated or overwritten: {size} bytes, the checkpoint wrote "
                f"{expected['bytes']}"
            )
        if file_digest(path) != expected["sha256"]:
            raise CheckpointError(
                f"{path}: corrupted: sha256 does not match the one recorded when it was saved"
            )


def load_checkpoint(
    folder: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and training state of one complete checkpoint folder, checksums verified."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    weights = load_weights(folder / MODEL_FILE)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors of many kinds
        raise CheckpointError(f"{folder / STATE_FILE}: not a readable state file ({err})") from None
    return weights, state


def _read_marker(folder: Path) -> dict[str, Any]:
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(
            f"{folder}: incomplete checkpoint (no {COMPLETE} marker; its save was interrupted)"
        )
    try:
        data = json.loads(marker.read_text())
        if not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' entry")
    except ValueError as err:
        raise CheckpointError(f"{marker}: unreadable completion marker ({err})") from None
    return data


def _prune(directory: Path, keep_last: int, keep: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to ``keep``; remove the rest.

    ``keep`` was just written, so it is the newest checkpoint of this run: folders after it
    are left over from an earlier run in the same directory, or interrupted saves, and go.
    """
    infos = list_checkpoints(directory)
    position = next(info.position for info in infos if info.path.name == keep)
    current = [info for info in infos if info.position <= position]
    complete = [info for info in current if info.complete]
    newest = {info.path.name for info in complete[-keep_last:]} | {keep}
    for info in infos:
        if info.path.name not in newest:
            shutil.rmtree(info.path, ignore_errors=True)
    for debris in directory.glob(".epoch-*"):  # staging folders of killed saves
        shutil.rmtree(debris, ignore_errors=True)
    for debris in directory.glob(f".{LATEST}.*.tmp"):
        debris.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
