"""The ``kdistill`` command line: ``run`` a YAML experiment, or the built-in ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kdistill.config import ConfigError, load_config
from kdistill.trainer import ResumeError


def _run(args: argparse.Namespace) -> int:
    from kdistill.experiment import run_experiment

    cfg = load_config(args.config, args.set)
    result = run_experiment(cfg, resume=args.resume)
    student = result.summary["student"]
    print(
        f"student {student['model']}: test accuracy {student['test_accuracy']:.4f} "
        f"(best {student['best_test_accuracy']:.4f}); weights in {student['weights']}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kdistill.demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        quick=args.quick,
        seed=args.seed,
        epochs=args.epochs,
        retrain_teacher=args.retrain_teacher,
        data_root=args.data,
        progress=not args.no_progress,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train from a YAML config")
    run.add_argument("config", help="path to an experiment YAML file")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set distill.temperature=8 (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="teacher vs student with and without KD on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke run on a subset")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=None, help="student epochs (default 15)")
    demo.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train the teacher instead of loading the shipped checkpoint",
    )
    demo.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ResumeError, FileNotFoundError) as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
