"""`kdistill sweep`: a T × alpha grid of short runs, its table, heatmap and best config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.sweep import SweepPoint, markdown_table


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "kd.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "sweep"),
                "teacher": {"model": "teacher_cnn", "checkpoint": "builtin:fashion_mnist_teacher"},
                "train": {"epochs": 1, "progress": False},
            }
        )
    )
    return path


def test_markdown_table_marks_the_best_cell() -> None:
    points = [
        SweepPoint(1.0, 0.5, "a", 0.80, 0.80, 1.0),
        SweepPoint(4.0, 0.5, "b", 0.85, 0.85, 1.0),
    ]
    table = markdown_table(points, [1.0, 4.0], [0.5, 0.9])
    assert "| 4 | **85.00 %** | – |" in table and "| 1 | 80.00 % | – |" in table


def test_sweep_grid_writes_table_heatmap_and_best_yaml(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    args = ["sweep", str(_config(tmp_path)), "--temperature", "1", "4", "--alpha", "0.5"]
    args += [f"--set={item}" for item in tiny_overrides] + ["--jobs", "2"]
    assert main(args) == 0
    root = tmp_path / "sweep"
    for point in ("T1_a0.5", "T4_a0.5"):
        assert (root / point / "summary.json").is_file()
    table = (root / "sweep.md").read_text()
    assert "| T \\ alpha | 0.5 |" in table and "**" in table
    heatmap = (root / "heatmap.png").read_bytes()
    assert heatmap[:4] == b"\x89PNG" and len(heatmap) > 1024
    result = json.loads((root / "sweep.json").read_text())
    best = result["best"]
    assert best["test_accuracy"] == max(p["test_accuracy"] for p in result["points"])

    cfg = load_config(root / "best.yaml")  # a valid config for kdistill run
    assert (cfg.distill.temperature, cfg.distill.alpha) == (best["temperature"], 0.5)
    assert cfg.student.model == "mlp" and cfg.data.train_subset == 256
    assert cfg.output_dir == str(root / "best")
    assert "best config" in capsys.readouterr().out


def test_sweep_refuses_a_config_without_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "x")}))
    assert main(["sweep", str(path), "--temperature", "2"]) == 2
    assert "no teacher" in capsys.readouterr().err
