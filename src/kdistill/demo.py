"""``kdistill demo``: teacher vs. the same student trained without and with KD.

1. Load the shipped Fashion-MNIST teacher (or train one with ``--retrain-teacher``).
2. Train the student on labels only (``alpha = 0``).
3. Train the same student, same seed and schedule, with the teacher (``alpha = 0.9``,
   ``T = 1``, chosen on validation; the teacher's logits computed once and reused each epoch).
4. Measure test accuracy, parameters, size on disk and CPU latency of all three and write
   ``report.md`` / ``report.json`` in the output folder.
5. Add the figures of :func:`kdistill.report.write_report` (``plots/*.png``) to ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kdistill.checkpoint import atomic_write_text
from kdistill.config import ExperimentConfig, ModelConfig, load_config
from kdistill.data.loader import TensorBatchLoader
from kdistill.experiment import builtin_checkpoint, load_data, load_model, run_experiment
from kdistill.report import ModelRow, comparison_table, model_row
from kdistill.trainer import evaluate

TEACHER_ASSET = "fashion_mnist_teacher"
LATENCY_BATCH = 256


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("kdistill") / "configs" / f"{name}.yaml"))


def demo_configs(
    output_dir: str | Path,
    quick: bool,
    seed: int,
    epochs: int | None,
    data_root: str | None,
    progress: bool,
    extra: list[str] | tuple[str, ...] = (),
) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The no-KD and KD student configs: identical except for the teacher and alpha.

    ``extra`` holds ``key=value`` overrides (as ``kdistill run --set``) applied to both.
    """
    overrides = [f"seed={seed}", f"train.progress={str(progress).lower()}"]
    if quick:
        overrides += ["data.train_subset=3000", "data.test_subset=1000", "train.epochs=2"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    overrides += list(extra)
    kd = load_config(packaged_config("fashion_mnist_demo"), overrides)
    kd.output_dir = str(Path(output_dir) / "student_kd")
    no_kd = dataclasses.replace(
        kd,
        teacher=None,
        output_dir=str(Path(output_dir) / "student_no_kd"),
        distill=dataclasses.replace(kd.distill, alpha=0.0),
    )
    return no_kd, kd


def teacher_config(
    output_dir: str | Path, quick: bool, seed: int, data_root: str | None, progress: bool
) -> ExperimentConfig:
    overrides = [
        f"seed={seed}",
        f"train.progress={str(progress).lower()}",
        f"output_dir={Path(output_dir) / 'teacher'}",
    ]
    if quick:
        overrides += ["data.train_subset=3000", "data.test_subset=1000", "train.epochs=2"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    return load_config(packaged_config("fashion_mnist_teacher"), overrides)


def run_demo(
    output_dir: str | Path = "runs/demo",
    quick: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    retrain_teacher: bool = False,
    data_root: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the three-way comparison; returns the report as a dict (also written to disk)."""
    output_dir = Path(output_dir)
    started = time.perf_counter()
    no_kd_cfg, kd_cfg = demo_configs(output_dir, quick, seed, epochs, data_root, progress)

    teacher_file = _teacher_weights(output_dir, quick, seed, data_root, progress, retrain_teacher)
    kd_cfg.teacher = ModelConfig(
        model=kd_cfg.teacher.model if kd_cfg.teacher else "teacher_cnn",
        checkpoint=str(teacher_file),
    )

    if quick:
        print(f"smoke run: {SMOKE_NOTE}")
    print(f"[1/2] student without KD ({no_kd_cfg.student.model}, {no_kd_cfg.train.epochs} epochs)")
    no_kd = run_experiment(no_kd_cfg)
    print(f"[2/2] student with KD (T={kd_cfg.distill.temperature}, alpha={kd_cfg.distill.alpha})")
    kd = run_experiment(kd_cfg)

    rows = _measure(kd_cfg, teacher_file, no_kd, kd, repeats=5 if quick else 30)
    table = comparison_table(rows, rows[0], LATENCY_BATCH)
    report = {
        "rows": [r.to_dict() for r in rows],
        # a smoke run (--quick: a subset, two epochs) says nothing about KD: no gain reported
        "kd_gain_points": None if quick else 100 * (rows[2].test_accuracy - rows[1].test_accuracy),
        "epochs": kd_cfg.train.epochs,
        "seed": seed,
        "quick": quick,
        "temperature": kd_cfg.distill.temperature,
        "alpha": kd_cfg.distill.alpha,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = _markdown(table, report)
    atomic_write_text(output_dir / "report.md", text)
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print("\n" + text)
    _figures(output_dir)
    print(f"written to {output_dir / 'report.md'}")
    return report


def _figures(output_dir: Path) -> None:
    """Add the ``kdistill report`` figures (PNG) to the demo's report, when matplotlib is here."""
    from kdistill.plots import PlotsUnavailable
    from kdistill.report import write_report

    try:
        figures = write_report(output_dir).figures
    except PlotsUnavailable as err:
        print(f"figures skipped: {err}")
        return
    print(f"figures: {', '.join(str(p) for p in figures.values())}")


def _teacher_weights(
    output_dir: Path, quick: bool, seed: int, data_root: str | None, progress: bool, retrain: bool
) -> Path:
    if not retrain:
        try:
            return builtin_checkpoint(TEACHER_ASSET)
        except FileNotFoundError:
            print("no shipped teacher checkpoint found; training one")
    cfg = teacher_config(output_dir, quick, seed, data_root, progress)
    print(f"[teacher] training {cfg.student.model} for {cfg.train.epochs} epochs")
    return run_experiment(cfg).fit.student_path


def _measure(
    kd_cfg: ExperimentConfig, teacher_file: Path, no_kd: Any, kd: Any, repeats: int
) -> list[ModelRow]:
    assert kd_cfg.teacher is not None
    _, (test_x, test_y) = load_data(kd_cfg)
    loader = TensorBatchLoader(test_x, test_y, batch_size=512)
    example = test_x[:LATENCY_BATCH]
    teacher = load_model(kd_cfg.teacher, "teacher")
    rows = [
        model_row(
            "teacher",
            teacher,
            evaluate(teacher, loader)["accuracy"],
            teacher_file,
            example,
            repeats,
        )
    ]
    for name, result in (("student without KD", no_kd), ("student with KD", kd)):
        student = load_model(
            dataclasses.replace(kd_cfg.student, checkpoint=str(result.fit.student_path))
        )
        rows.append(
            model_row(
                name,
                student,
                evaluate(student, loader)["accuracy"],
                result.fit.student_path,
                example,
                repeats,
            )
        )
    return rows


SMOKE_NOTE = (
    "Smoke run (--quick: 3000 training images, a few epochs): it checks that the pipeline "
    "works end to end. Its accuracies say nothing about what KD does; run kdistill demo "
    "without --quick for the comparison."
)


def _markdown(table: str, report: dict[str, Any]) -> str:
    gain = report["kd_gain_points"]
    effect = (
        f"{SMOKE_NOTE} "
        if gain is None
        else f"KD changed the student's test accuracy by {gain:+.2f} points "
    )
    return (
        "# kdistill demo: Fashion-MNIST\n\n"
        f"{table}\n"
        f"{effect}(seed {report['seed']}, {report['epochs']} epochs, T = "
        f"{report['temperature']}, alpha = {report['alpha']}). "
        f"Latency: median of CPU forward passes with {report['threads']} threads. "
        f"Total time {report['seconds']:.0f} s.\n"
    )
