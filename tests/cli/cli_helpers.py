"""Helpers of the command-line tests: run ``python -m kdistill`` like a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kdistill.data import DatasetNotFoundError, find_fashion_mnist

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "own_data"


def have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:  # pragma: no cover - CI installs the Debian package
        return False
    return True


def kdistill(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m kdistill ARGS`` in ``cwd``, as a user would run it (no PYTHONPATH)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KDISTILL_DEBUG")}
    environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "kdistill", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
