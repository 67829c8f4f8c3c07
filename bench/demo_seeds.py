"""The demo's comparison over several seeds: student without KD vs. with KD, mean ± std.

    python bench/demo_seeds.py --seeds 0 1 2          # ≈ 25 min on 2 CPU cores

Same configs as ``kdistill demo`` (src/kdistill/configs/fashion_mnist_demo.yaml): per seed,
the same student init, batch order and schedule with alpha = 0 and with the teacher. Prints
a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from kdistill.demo import demo_configs
from kdistill.experiment import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--output-dir", default="runs/demo_seeds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for both runs, e.g. distill.temperature=8",
    )
    parser.add_argument(
        "--no-kd-from",
        type=Path,
        help="read the students without KD from this earlier --output-dir (they do not depend "
        "on T or alpha); their configs must equal this run's but for output_dir",
    )
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        no_kd_cfg, kd_cfg = demo_configs(
            Path(args.output_dir) / f"seed{seed}",
            quick=False,
            seed=seed,
            epochs=args.epochs,
            data_root=None,
            progress=False,
            extra=args.set,
        )
        if args.no_kd_from is not None:
            no_kd = _finished_no_kd(args.no_kd_from / f"seed{seed}" / "student_no_kd", no_kd_cfg)
        else:
            no_kd = run_experiment(no_kd_cfg).summary
        kd = run_experiment(kd_cfg).summary
        row = {
            "seed": seed,
            "no_kd": no_kd["student"]["test_accuracy"],
            "kd": kd["student"]["test_accuracy"],
            "no_kd_best": no_kd["student"]["best_test_accuracy"],
            "kd_best": kd["student"]["best_test_accuracy"],
            "no_kd_s": no_kd["seconds"],
            "kd_s": kd["seconds"],
            "teacher": kd["teacher"]["test_accuracy"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(_markdown(rows, kd_cfg))


def _finished_no_kd(folder: Path, cfg) -> dict:
    """The summary of a finished no-KD run of the same config (the output folder aside)."""
    summary = json.loads((folder / "summary.json").read_text())
    theirs, mine = dict(summary["config"]), json.loads(json.dumps(cfg.to_dict()))
    theirs.pop("output_dir"), mine.pop("output_dir")
    theirs["distill"].pop("temperature", None), mine["distill"].pop("temperature", None)
    if theirs != mine:
        raise SystemExit(f"{folder}: its config differs from this run's student without KD")
    return summary


def _stat(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _markdown(rows: list[dict], kd_cfg) -> str:
    gains = [r["kd"] - r["no_kd"] for r in rows]
    lines = [
        f"commit {_commit()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{kd_cfg.student.model} student, {kd_cfg.train.epochs} epochs, "
        f"T = {kd_cfg.distill.temperature}, alpha = {kd_cfg.distill.alpha}, seeds "
        f"{[r['seed'] for r in rows]}; teacher {100 * rows[0]['teacher']:.2f} %",
        "",
        "| student | test acc. (last epoch) | best epoch | seconds per run |",
        "|---|---:|---:|---:|",
        f"| without KD | {_stat([r['no_kd'] for r in rows])} % | "
        f"{_stat([r['no_kd_best'] for r in rows])} % | "
        f"{statistics.mean(r['no_kd_s'] for r in rows):.0f} |",
        f"| with KD | {_stat([r['kd'] for r in rows])} % | "
        f"{_stat([r['kd_best'] for r in rows])} % | "
        f"{statistics.mean(r['kd_s'] for r in rows):.0f} |",
        "",
        f"KD gain per seed (points): {', '.join(f'{100 * g:+.2f}' for g in gains)}; "
        f"mean {_stat(gains)}.",
    ]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
