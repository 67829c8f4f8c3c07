"""`kdistill demo --quick` and `kdistill run` work end to end on real Fashion-MNIST (small subsets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main
from kdistill.data import find_fashion_mnist

try:
    find_fashion_mnist()
except FileNotFoundError:  # pragma: no cover - CI installs the Debian package
    pytest.skip("Fashion-MNIST not installed", allow_module_level=True)


def test_quick_demo_writes_a_three_row_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(["demo", "--quick", "--epochs", "1", "--output-dir", str(tmp_path), "--no-progress"])
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["teacher", "student without KD", "student with KD"]
    teacher, no_kd, kd = report["rows"]
    assert teacher["parameters"] > 10 * kd["parameters"]
    assert kd["parameters"] == no_kd["parameters"]
    assert all(row["size_bytes"] > 0 and row["latency_ms"] > 0 for row in report["rows"])
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in report["rows"])
    table = (tmp_path / "report.md").read_text()
    assert "% of teacher acc." in table and "student with KD" in table
    assert "student with KD" in capsys.readouterr().out


def test_run_command_trains_from_yaml_and_refuses_to_resume_a_changed_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"train_subset": 256, "test_subset": 128, "batch_size": 64},
        "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
        "optim": {"schedule": "cosine"},
        "train": {"epochs": 2, "progress": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--set", "distill.alpha=0.5"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "student.safetensors").stat().st_size > 0
    capsys.readouterr()

    assert main(["run", str(path), "--set", "optim.lr=0.1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err
