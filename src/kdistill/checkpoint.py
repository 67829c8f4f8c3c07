"""Atomic checkpoints: a crash never leaves a half-written file where a good one was.

A checkpoint is a folder ``checkpoints/epoch-0003/`` holding

- ``model.safetensors`` — student and adapter weights (never the frozen teacher),
- ``state.pt`` — optimizer, scheduler, epoch, RNG states and metric history.

Each file is written to a temporary name in the same folder, flushed with ``fsync`` and
moved into place with ``os.replace``; the folder is assembled under a temporary name and
renamed last; the ``latest`` pointer is replaced atomically after that. Resume reads the
folder that ``latest`` names, so it only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
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


def save_checkpoint(
    directory: str | os.PathLike[str],
    epoch: int,
    weights: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``directory/epoch-XXXX`` and point ``directory/latest`` at it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch-{epoch:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        save_weights(staging / MODEL_FILE, weights)
        atomic_write(staging / STATE_FILE, lambda tmp: torch.save(dict(state), tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(directory)
    atomic_write_text(directory / LATEST, json.dumps({"epoch": epoch, "path": final.name}) + "\n")
    _prune(directory, keep_last, keep=final.name)
    return final


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The folder named by ``directory/latest``, or ``None`` when there is no checkpoint."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["path"]
    folder = Path(directory) / name
    if not (folder / MODEL_FILE).is_file() or not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder}, which is incomplete or missing")
    return folder


def load_checkpoint(folder: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and training state of one checkpoint folder."""
    folder = Path(folder)
    weights = load_weights(folder / MODEL_FILE)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return weights, state


def _prune(directory: Path, keep_last: int, keep: str) -> None:
    folders = sorted(p for p in directory.glob("epoch-*") if p.is_dir())
    for old in folders[: max(0, len(folders) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


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
