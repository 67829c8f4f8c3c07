"""Dense distillation on the Fashion-MNIST canvases: the student without KD vs each dense KD
method, detection and segmentation, over seeds.

    python bench/dense.py --seeds 0 1 2 --threads 2                    # the protocol below
    python bench/dense.py --seeds 0 --train-images 64 --teacher-epochs 1 --epochs 1   # smoke
    python bench/dense.py --table-only ...                             # tables from finished runs

Protocol, the same for every arm of a task and seed: ``--train-images`` canvases (seeded by the
run seed; ``--val-images`` for the per-epoch validation, ``--test-images`` canvases of t10k
items for the table), the shipped teacher and student sizes (:mod:`kdistill.dense.models`),
``--teacher-epochs`` for the teacher (trained once per task and seed, then loaded by every KD
arm), ``--epochs`` for every student, the same student initialisation and batch order with and
without KD, the teacher's outputs cached (``distill.cache_teacher``). Each arm is a
:func:`kdistill.dense.run.run_dense` call on ``examples/dense/<task>.yaml`` with overrides; it
lives in ``<output-dir>/<task>/<arm>/seed<S>`` and is reused when its ``summary.json`` exists
(so an interrupted bench resumes arm by arm).

Arms (loss weights fixed from the papers' or from the loss magnitudes at the trained teacher,
not tuned here):

* detection — ``cwd`` on the FPN output (τ = 1, weight 5; Shu et al. 2021), ``pkd`` on the FPN
  output (weight 6; Cao et al. 2022), ``heatmap_kd`` on the class heatmap logits (teacher
  foreground weighting, weight 20), ``box_kd`` on the boxes where the teacher is confident
  (GIoU, weight 2);
* segmentation — ``cwd`` on the logits (τ = 4, weight 3; Shu et al. 2021), ``pkd`` on the
  bottleneck (weight 6), ``pixel_kd`` on the logits (T = 1, weight 10; Liu et al. 2019).

Prints one Markdown table per task: mean ± std over the seeds of the test mAP@[.5:.95] and
mAP@.5 (detection) or mIoU and pixel accuracy (segmentation), the paired per-seed difference
to the student without KD, parameters and latency; ``--markdown`` / ``--json`` write them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kdistill.config import read_config_file  # noqa: E402
from kdistill.dense.config import dense_config_from_dict  # noqa: E402
from kdistill.dense.run import run_dense  # noqa: E402

METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "detection": {
        "cwd": {
            "loss": "cwd",
            "student": "neck",
            "teacher": "neck",
            "weight": 5.0,
            "params": {"temperature": 1.0},
        },
        "pkd": {"loss": "pkd", "student": "neck", "teacher": "neck", "weight": 6.0},
        "heatmap_kd": {
            "loss": "heatmap_kd",
            "student": "head.cls",
            "teacher": "head.cls",
            "weight": 20.0,
        },
        "box_kd": {"loss": "box_kd", "student": "logits", "teacher": "logits", "weight": 2.0},
    },
    "segmentation": {
        "cwd": {"loss": "cwd", "weight": 3.0, "params": {"temperature": 4.0}},
        "pkd": {"loss": "pkd", "student": "bottleneck", "teacher": "bottleneck", "weight": 6.0},
        "pixel_kd": {"loss": "pixel_kd", "weight": 10.0, "params": {"temperature": 1.0}},
    },
}
METRICS = {"detection": ("map", "map50"), "segmentation": ("miou", "pixel_accuracy")}
HEADERS = {"detection": ("mAP@[.5:.95]", "mAP@.5"), "segmentation": ("mIoU", "pixel acc.")}


def arm_config(task: str, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The run config of one arm: the example file with the protocol's overrides."""
    data = read_config_file(ROOT / "examples" / "dense" / f"{task}.yaml")
    out = Path(args.output_dir) / task
    data.update(
        seed=seed, output_dir=str(out / arm / f"seed{seed}"), teacher_epochs=args.teacher_epochs
    )
    data["data"] = {
        **data.get("data", {}),
        "root": str(Path(args.output_dir) / "data" / f"seed{seed}"),
        "train_images": args.train_images,
        "val_images": args.val_images,
        "test_images": args.test_images,
    }
    data["train"] = {
        **data.get("train", {}),
        "epochs": args.epochs,
        "progress": False,
        "tensorboard": False,
    }
    if args.threads:
        data["train"]["threads"] = args.threads
    first = next(iter(METHODS[task]))
    data["baseline"] = arm == first  # the student without KD is trained once, beside the first arm
    if arm != first:  # every other arm loads the first arm's teacher
        data["teacher"] = {
            **data.get("teacher", {}),
            "checkpoint": str(out / first / f"seed{seed}" / "teacher" / "student.safetensors"),
        }
    data["distill"] = {**data.get("distill", {}), "terms": [{"name": arm, **METHODS[task][arm]}]}
    return data


def run_arm(task: str, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = arm_config(task, arm, seed, args)
    summary_path = Path(cfg["output_dir"]) / "summary.json"
    if summary_path.is_file() and not args.force:
        return json.loads(summary_path.read_text())
    if args.table_only:
        return {}
    began = time.perf_counter()
    summary = run_dense(dense_config_from_dict(cfg)).summary
    print(f"{task} {arm} seed {seed}: {time.perf_counter() - began:.0f} s", flush=True)
    return summary


def stat(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}"


def task_table(task: str, runs: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int]) -> str:
    first = next(iter(METHODS[task]))
    m0, m1 = METRICS[task]
    h0, h1 = HEADERS[task]

    def rows_of(arm: str, model: str) -> list[dict[str, Any]]:
        return [
            runs[(arm, s)]["models"][model]
            for s in seeds
            if runs.get((arm, s), {}).get("models", {}).get(model)
        ]

    baseline = {s: runs[(first, s)]["models"]["student"][m0] for s in seeds if runs.get((first, s))}
    lines = [
        f"| {task} | {h0} | {h1} | Δ {h0} vs no KD (paired) | parameters | latency (ms, 16 images) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    entries = [("teacher", first, "teacher"), ("student, no KD", first, "student")]
    entries += [(f"student + {arm}", arm, "student_kd") for arm in METHODS[task]]
    for label, arm, model in entries:
        rows = rows_of(arm, model)
        if not rows:
            continue
        diffs = [
            runs[(arm, s)]["models"][model][m0] - baseline[s]
            for s in seeds
            if model == "student_kd" and runs.get((arm, s)) and s in baseline
        ]
        lines.append(
            f"| {label} | {stat([r[m0] for r in rows])} | {stat([r[m1] for r in rows])} | "
            f"{stat(diffs) if diffs else ''} | {rows[0]['parameters']:,} | "
            f"{statistics.median(r['latency_ms'] for r in rows):.1f} |"
        )
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--methods", nargs="+", default=None, help="only these arms (names of METHODS)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every student")
    parser.add_argument("--threads", type=int, default=None, help="train.threads of every run")
    parser.add_argument("--output-dir", default="runs/bench_dense")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--table-only", action="store_true", help="read finished runs, train none")
    parser.add_argument("--force", action="store_true", help="retrain arms that finished before")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    began = time.perf_counter()
    tables, raw = [], {}
    for task in args.tasks:
        arms = [
            a
            for a in METHODS[task]
            if args.methods is None or a in args.methods or a == next(iter(METHODS[task]))
        ]
        runs = {(arm, s): run_arm(task, arm, s, args) for s in args.seeds for arm in arms}
        tables.append(task_table(task, runs, args.seeds))
        raw[task] = {f"{arm}/seed{s}": r.get("models") for (arm, s), r in runs.items()}
    head = (
        f"Commit {_commit()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; seeds {args.seeds}; {args.train_images} training canvases, "
        f"{args.test_images} test canvases; teacher {args.teacher_epochs} epochs, students {args.epochs}; "
        f"wall time {time.perf_counter() - began:.0f} s.\n\n"
        f"Command: python bench/dense.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
    )
    text = head + "\n" + "\n\n".join(tables) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": raw}, indent=2) + "\n")
    return text


if __name__ == "__main__":
    main()
