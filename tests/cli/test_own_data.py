"""``examples/own_data``: a user's own teacher and student classes (``models.py`` next to the
YAML), trained and distilled on an image folder and on ``.npz`` arrays from YAML only, then
exported and used for predictions — each step a ``python -m kdistill`` run from a working
directory that is NOT the example's folder (no PYTHONPATH: the config's folder is enough).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cli_helpers import kdistill

QUICK = [
    "--set",
    "train.epochs=1",
    "--set",
    "data.batch_size=20",
    "--set",
    "train.tensorboard=false",
]


def _ok(result: object) -> None:
    assert result.returncode == 0, result.stderr[-2000:]  # type: ignore[attr-defined]


def test_example_distils_own_classes_on_an_image_folder_and_on_npz_arrays(
    project: Path, tmp_path: Path
) -> None:
    cwd = tmp_path / "elsewhere"  # runs/ lands here; models.py and images/ stay in project
    cwd.mkdir()
    teacher = kdistill("run", str(project / "teacher.yaml"), *QUICK, cwd=cwd)
    _ok(teacher)
    # logs a person can read: one line per epoch on stdout, no progress-bar frames in a file
    assert "epoch 1: train_loss" in teacher.stdout
    assert "\r" not in teacher.stdout + teacher.stderr

    for config, source in (("distill_folder.yaml", "image_folder"), ("distill_npz.yaml", "npz")):
        result = kdistill("run", str(project / config), *QUICK, cwd=cwd)
        _ok(result)
        out = (
            cwd
            / "runs"
            / "own_data"
            / ("student_folder" if source == "image_folder" else "student_npz")
        )
        summary = json.loads((out / "summary.json").read_text())
        assert summary["student"]["model"] == "models:Student"
        assert summary["teacher"]["model"] == "models:Teacher"
        assert [t["name"] for t in summary["terms"]] == ["kd", "ce"]
        data = summary["data"]
        assert data["name"] == source and data["num_classes"] == 10
        assert data["input_shape"] == [1, 28, 28] and len(data["fingerprint"]["sha256"]) == 64
        assert summary["import_dirs"] == [str(project)]
    npz = json.loads((cwd / "runs/own_data/student_npz/summary.json").read_text())["data"]
    assert npz["path"] == str(project / "arrays.npz") and npz["train_samples"] == 60
    assert npz["classes"][0] == "T-shirt/top" and npz["files"][0]["bytes"] > 0

    # export and predict from yet another folder: the custom class is found via the export
    run_dir = cwd / "runs" / "own_data" / "student_folder"
    other = tmp_path / "other"
    other.mkdir()
    _ok(kdistill("export", str(run_dir), cwd=other))
    exported = run_dir / "export" / "student.safetensors"
    images = np.load(project / "arrays.npz")["x_test"][:4]  # (4, 28, 28) uint8
    np.save(other / "images.npy", images)
    predicted = kdistill("predict", str(exported), "images.npy", cwd=other)
    _ok(predicted)
    rows = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert len(rows) == 4 and all(0 <= int(r[1]) < 10 for r in rows)
    assert {r[2] for r in rows} <= {p.name for p in (project / "images").iterdir()}
    # the report reads the run's own test split and class names (not a built-in data set)
    report = kdistill("report", str(run_dir), cwd=other)
    _ok(report)
    assert (run_dir / "report.md").is_file() and "confusion" in report.stdout
