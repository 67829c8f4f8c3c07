"""Every method of the zoo benchmark trains end to end (tiny subsets, one epoch)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kdistill.data import find_fashion_mnist

try:
    find_fashion_mnist()
except FileNotFoundError:  # pragma: no cover - CI installs the Debian package
    pytest.skip("Fashion-MNIST not installed", allow_module_level=True)

ZOO = Path(__file__).resolve().parents[2] / "bench" / "zoo.py"


def load_zoo():
    spec = importlib.util.spec_from_file_location("zoo", ZOO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_zoo_method_runs_and_lands_in_the_table(tmp_path: Path) -> None:
    zoo = load_zoo()
    table = zoo.main(
        [
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--train-subset",
            "512",
            "--test-subset",
            "256",
            "--batch-size",
            "64",
            "--no-write",
            "--output-dir",
            str(tmp_path),
        ]
    )
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == [m.name for m in zoo._methods()]
    assert len(names) == 12


def test_update_section_replaces_only_the_marked_block(tmp_path: Path) -> None:
    zoo = load_zoo()
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nbefore\n")
    zoo.update_section(path, "zoo", "table one\n")
    zoo.update_section(path, "zoo", "table two\n")
    text = path.read_text()
    assert "table one" not in text and text.count("table two") == 1
    assert text.startswith("# Results\n\nbefore\n")
