"""The output folder of a command-line run: never re-used by accident, always writable.

:func:`prepare_output_dir` is called by ``kdistill run`` / ``kdistill lm`` before anything
trains. A folder that already holds something is an error unless ``--resume`` (continue the
run it holds: then it must hold a checkpoint) or ``--overwrite`` (clear it first, including an
old ``export/``); the folder is then created and a probe file written, so a read-only or full
disk fails in the first second with the folder's name rather than after an epoch.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kdistill.checkpoint import latest_checkpoint
from kdistill.config import ConfigError

__all__ = ["RUN_MARKERS", "describe_os_error", "find_checkpoints", "prepare_output_dir"]

RUN_MARKERS = ("summary.json", "metrics.jsonl", "metrics.csv", "steps.jsonl", "checkpoints")
"""Entries that show a folder (or one of its sub-folders) was written by a kdistill run."""

_PROBE = ".kdistill-write-test"


def find_checkpoints(output_dir: Path) -> list[Path]:
    """The newest complete checkpoint of every ``checkpoints/`` folder under ``output_dir``."""
    found = []
    for folder in sorted(output_dir.rglob("checkpoints")) if output_dir.is_dir() else []:
        latest = latest_checkpoint(folder) if folder.is_dir() else None
        if latest is not None:
            found.append(latest)
    return found


def _looks_like_a_run(folder: Path) -> bool:
    candidates = [folder, *(p for p in folder.iterdir() if p.is_dir())]
    return any((c / marker).exists() for c in candidates for marker in RUN_MARKERS)


def _refuse_to_clear(folder: Path, protected: list[Path]) -> str | None:
    resolved = folder.resolve()
    for place in protected:
        place = place.resolve()
        if resolved == place or resolved in place.parents:
            return f"it holds {place}"
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        return "it is a root or home folder"
    if not _looks_like_a_run(folder):
        return "it does not look like a kdistill run folder (no summary.json, checkpoints/, ...)"
    return None


def prepare_output_dir(
    output_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    key: str = "output_dir",
    protected: tuple[Path, ...] = (),
) -> Path:
    """Check and create the run folder (see the module docstring); returns it.

    ``protected`` paths (the config file, the data) are never deleted by ``overwrite``.
    """
    folder = Path(output_dir).expanduser()
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file; give a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if resume:
        if not find_checkpoints(folder):
            raise ConfigError(
                f"--resume: no complete checkpoint under {folder} (looked in every checkpoints/ "
                "folder); run without --resume to start a new run"
            )
    elif entries:
        if not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(
                f"{key}: {folder} is not empty ({shown}); pass --resume to continue that run, "
                f"--overwrite to delete it and start again, or set another {key}"
            )
        reason = _refuse_to_clear(folder, [Path.cwd(), *protected])
        if reason:
            raise ConfigError(
                f"--overwrite: will not delete {folder}: {reason}; remove it yourself"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / _PROBE
    probe.write_bytes(b"ok")  # an OSError here names the folder (read-only, full, no access)
    probe.unlink()
    return folder


_OS_PROBLEMS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def describe_os_error(err: OSError) -> str | None:
    """One line for an OSError a user can fix (a path that is read-only, full, forbidden,
    missing, ...), or ``None`` for one that is not about a named file (a bug: show the stack)."""
    path = err.filename
    if err.errno in _OS_PROBLEMS:
        where = f"cannot write or read {path}" if path else "a file operation failed"
        action = (
            "free some space or choose an output_dir on another disk"
            if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a folder you can write to (output_dir) or fix the permissions"
        )
        return f"{where}: {_OS_PROBLEMS[err.errno]}; {action}"
    if path:
        reason = err.strerror or os.strerror(err.errno or 0) or type(err).__name__
        return f"{path}: {reason}"
    return None
