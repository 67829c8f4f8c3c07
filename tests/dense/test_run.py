"""End to end: tiny detection and segmentation runs (teacher, student, student + KD) on the
Fashion-MNIST canvases written to disk and read back, and the config errors a user can make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.config import ConfigError
from kdistill.data.fashion_mnist import SYSTEM_DATA_DIR
from kdistill.dense.config import dense_config_from_dict
from kdistill.dense.run import DenseDistiller, run_dense, task_term

pytestmark = pytest.mark.skipif(
    not SYSTEM_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)


def _config(tmp_path: Path, task: str, **extra: Any) -> dict[str, Any]:
    tiny = (
        {"widths": [4, 8, 8, 8]} if task == "segmentation" else {"widths": [4, 8, 8, 8], "neck": 8}
    )
    small = (
        {"widths": [4, 4, 4, 8]} if task == "segmentation" else {"widths": [4, 4, 4, 8], "neck": 4}
    )
    cfg = {
        "task": task,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "root": str(tmp_path / "data"),
            "canvas": 48,
            "train_images": 16,
            "val_images": 4,
            "test_images": 4,
            "batch_size": 8,
        },
        "teacher": tiny,
        "student": small,
        "teacher_epochs": 1,
        "train": {"epochs": 1, "progress": False, "tensorboard": False},
        "eval": {"plot_images": 2},
    }
    cfg.update(extra)
    return cfg


def _check_run(out: Path, summary: dict[str, Any], metric: str) -> None:
    assert set(summary["models"]) == {"teacher", "student", "student_kd"}
    for row in summary["models"].values():
        assert 0.0 <= row[metric] <= 1.0 and row["parameters"] > 0 and row["latency_ms"] > 0
    assert summary["models"]["teacher"]["parameters"] > summary["models"]["student"]["parameters"]
    assert json.loads((out / "summary.json").read_text())["task"] == summary["task"]
    assert (out / "predictions.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert ("mAP@[.5:.95]" if metric == "map" else "mIoU") in report
    assert f"| student_kd | {100 * summary['models']['student_kd'][metric]:.2f} |" in report
    rows = (out / "student_kd" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "train_task_loss" in rows[0]


def test_tiny_detection_run_trains_teacher_student_and_kd_student(tmp_path: Path) -> None:
    terms = [
        {
            "name": "cwd",
            "loss": "cwd",
            "student": "neck",
            "teacher": "neck",
            "params": {"temperature": 1.0},
        },
        {"name": "hm", "loss": "heatmap_kd", "student": "head.cls", "teacher": "head.cls"},
        {
            "name": "box",
            "loss": "box_kd",
            "student": "logits",
            "teacher": "logits",
            "params": {"threshold": 0.0},
        },
    ]
    cfg = dense_config_from_dict(_config(tmp_path, "detection", distill={"terms": terms}))
    result = run_dense(cfg)
    out = Path(cfg.output_dir)
    _check_run(out, result.summary, "map")
    header = (out / "student_kd" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train_{n}_loss" in header for n in ("cwd", "hm", "box"))
    assert "test_map50" in header
    # the narrower student neck got an adapter, saved with the KD student's checkpoint
    assert (out / "student_kd" / "student.safetensors").is_file()

    # a second run loads the trained teacher instead of training it, and skips the baseline
    teacher_weights = out / "teacher" / "student.safetensors"
    again = _config(tmp_path, "detection", baseline=False, output_dir=str(tmp_path / "again"))
    again["teacher"] = {**again["teacher"], "checkpoint": str(teacher_weights)}
    second = run_dense(dense_config_from_dict(again))
    assert set(second.summary["models"]) == {"teacher", "student_kd"}
    assert second.summary["models"]["teacher"]["map"] == result.summary["models"]["teacher"]["map"]


def test_tiny_segmentation_run_with_pixel_kd_and_pkd(tmp_path: Path) -> None:
    terms = [
        {"name": "pixel", "loss": "pixel_kd", "params": {"temperature": 2.0}},
        {"name": "pkd", "loss": "pkd", "student": "bottleneck", "teacher": "bottleneck"},
    ]
    cfg = dense_config_from_dict(_config(tmp_path, "segmentation", distill={"terms": terms}))
    result = run_dense(cfg)
    _check_run(Path(cfg.output_dir), result.summary, "miou")
    assert result.summary["runs"]["student_kd"]["terms"][1]["loss"] == "PixelKDLoss"


def test_segmentation_train_accuracy_is_the_pixel_accuracy() -> None:
    student = torch.nn.Conv2d(1, 3, 1)
    distiller = DenseDistiller(
        student, [task_term(dense_config_from_dict({"task": "segmentation"}))], task="segmentation"
    )
    x, y = torch.randn(2, 1, 4, 4), torch.randint(0, 3, (2, 4, 4))
    out = distiller(x, y)
    assert out["logits"].shape == (2, 4, 4, 3)
    torch.testing.assert_close(out["logits"].argmax(-1), student(x).argmax(1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"data": {"source": "masks", "root": "x"}},
            "data.source: 'masks' does not give detection labels",
        ),
        ({"data": {"source": "coco"}}, "data.root: source 'coco' needs the data folder"),
        ({"data": {"canvas": 50}}, "data.canvas: must be a multiple of 16"),
        ({"student": {"widths": [1, 2]}}, "student.widths: give 4 positive channel counts"),
        ({"task": "detection", "tesk": 1}, "did you mean 'task'"),
    ],
)
def test_config_mistakes_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dense_config_from_dict(change)


def test_unknown_layer_and_loss_names_are_config_errors(tmp_path: Path) -> None:
    bad_layer = [{"name": "cwd", "loss": "cwd", "student": "nek", "teacher": "neck"}]
    cfg = dense_config_from_dict(_config(tmp_path, "detection", distill={"terms": bad_layer}))
    with pytest.raises(ConfigError, match=r"no module named 'nek'.*closest: 'neck'"):
        run_dense(cfg)
    bad_loss = [{"name": "x", "loss": "cwdd", "student": "neck", "teacher": "neck"}]
    cfg = dense_config_from_dict(_config(tmp_path, "detection", distill={"terms": bad_loss}))
    with pytest.raises(ConfigError, match="did you mean 'cwd'"):
        run_dense(cfg)


def test_kdistill_run_takes_a_dense_task_config(tmp_path: Path, capsys: Any) -> None:
    """``kdistill run`` with ``task: segmentation`` runs the dense workflow (one CLI)."""
    import yaml

    from kdistill.cli import main

    config = tmp_path / "seg.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, "segmentation")))
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "student_kd: miou" in out and "report.md" in out
    _check_run(
        tmp_path / "run", json.loads((tmp_path / "run" / "summary.json").read_text()), "miou"
    )


def test_detection_logs_no_train_accuracy() -> None:
    """Box targets ``(B, M, 5)`` line up with no logits: NaN, not a made-up accuracy."""
    from kdistill.trainer import _classes_last

    boxes = torch.zeros(2, 3, 5)
    assert not _classes_last(torch.randn(2, 8, 16, 16), boxes)
    assert not _classes_last(torch.randn(2, 3, 5), boxes)  # float targets are not class ids
    assert _classes_last(torch.randn(2, 4, 4, 3), torch.zeros(2, 4, 4, dtype=torch.long))
