"""``python -m kdistill.schemes run FILE.yaml [--set key=value ...] [--resume]``.

Runs a scheme file (an experiment YAML with a ``scheme:`` section, see
:mod:`kdistill.schemes.config`) until ``kdistill run`` dispatches such files itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdistill.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdistill.schemes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train from a scheme YAML file")
    run.add_argument("config", help="experiment YAML with a scheme: section")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set scheme.mutual.alpha=0.3 (repeatable)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoints")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kdistill.schemes.runner import run_scheme_file

    try:
        result = run_scheme_file(args.config, args.set, resume=args.resume)
    except ConfigError as err:
        print(f"kdistill: config error: {err}", file=sys.stderr)
        return 2
    summary = result.summary
    if "generations" in summary:
        for row in summary["generations"]:
            extra = row.get("ensemble_test_accuracy")
            ens = f" (ensemble of 1..{row['generation']}: {extra:.4f})" if extra is not None else ""
            acc = row["test_accuracy"]
            print(
                f"generation {row['generation']}: test accuracy "
                f"{'n/a' if acc is None else f'{acc:.4f}'}{ens}"
            )
    else:
        student = summary["student"]
        print(
            f"{summary['scheme']['name']}: student {student['model']} test accuracy "
            f"{student['test_accuracy']:.4f} (best {student['best_test_accuracy']:.4f}); "
            f"weights in {student['weights']}"
        )
    for key in ("peers", "heads", "knn", "ema_teacher", "teacher", "pseudo_labels"):
        if summary.get(key) is not None:
            print(f"{key}: {json.dumps(summary[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
