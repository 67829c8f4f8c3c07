"""Methods side by side from finished ``kdistill sweep`` runs: paired test differences to a
baseline per seed, a verdict per row, and a plot of accuracy per method with every seed.

    python bench/tuning/compare.py --baseline "CE alone=runs/tuning/schemes_lowdata/baseline/final.json" \\
        --arm "DML=runs/tuning/schemes_lowdata/dml/final.json" ... --plot docs/tuning/schemes_lowdata.png

Each ``NAME=FILE`` is a sweep's ``<name>.json``; its first point is the arm (the final sweep
of a chosen point has one). ``--arm NAME=FILE@LABEL`` picks the point with that label. The
table is :func:`kdistill.sweep.markdown_table`'s: the verdict is "wins" / "loses" only when
the mean paired difference exceeds the seed spread (issue 16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdistill.sweep import SeedRun, SweepPoint, SweepResult, markdown_table, spread_plot


def load_point(spec: str) -> SweepPoint:
    """``NAME=FILE[@LABEL]`` → that sweep point, labelled ``NAME``."""
    name, _, where = spec.partition("=")
    path, _, label = where.partition("@")
    data = json.loads(Path(path).read_text())
    points = data["points"]
    chosen = next((p for p in points if p["label"] == label), None) if label else points[0]
    if chosen is None:
        raise SystemExit(f"{path}: no point labelled {label!r} ({[p['label'] for p in points]})")
    return SweepPoint({"method": name}, name, [SeedRun(**r) for r in chosen["runs"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="NAME=FILE[@LABEL]")
    parser.add_argument("--arm", action="append", default=[], help="NAME=FILE[@LABEL]")
    parser.add_argument("--plot", type=Path, help="accuracy per method, every seed a dot")
    args = parser.parse_args()
    points = [load_point(args.baseline), *(load_point(a) for a in args.arm)]
    result = SweepResult(points, points[0], [], "val_accuracy", Path("."))
    print(markdown_table(result, ["method"]))
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"![test accuracy per method]({spread_plot(result, args.plot)})")


if __name__ == "__main__":
    main()
