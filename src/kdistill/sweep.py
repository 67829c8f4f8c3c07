"""``kdistill sweep``: a grid of short runs over temperature × alpha, a table, a heatmap.

Every grid point is an ordinary :func:`~kdistill.experiment.run_experiment` of the given
config with ``distill.temperature`` and ``distill.alpha`` overridden, written to
``<output_dir>/T<t>_a<alpha>/``. With ``jobs > 1`` the points run in a process pool and
the CPU threads are split between the jobs (``train.threads``). The sweep folder then holds

- ``sweep.md`` — final test accuracy per (T, alpha), best in bold,
- ``sweep.json`` — every point's figures,
- ``heatmap.png`` — the same grid as a picture (needs matplotlib),
- ``best.yaml`` — the config with the best T and alpha, ready for ``kdistill run``.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kdistill.checkpoint import atomic_write_text
from kdistill.config import ConfigError, ExperimentConfig, load_config


@dataclass
class SweepPoint:
    temperature: float
    alpha: float
    output_dir: str
    test_accuracy: float  # after the last epoch
    best_test_accuracy: float  # best epoch (for information; selection uses the final one)
    seconds: float


@dataclass
class SweepResult:
    points: list[SweepPoint]
    best: SweepPoint
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def point_dir(root: str | Path, temperature: float, alpha: float) -> Path:
    return Path(root) / f"T{temperature:g}_a{alpha:g}"


def check_sweepable(cfg: ExperimentConfig) -> None:
    """T and alpha only mean something for the default KD objective with a teacher."""
    if cfg.teacher is None:
        raise ConfigError("sweep: the config has no teacher: section; T and alpha need one")
    if cfg.distill.terms:
        raise ConfigError(
            "sweep: the config sets distill.terms, which do not use distill.temperature or "
            "distill.alpha; sweep a config with the default KD objective"
        )
    if cfg.stages:
        raise ConfigError("sweep: multi-stage configs (stages:) are not supported")


def _run_point(
    config: str,
    overrides: list[str],
    temperature: float,
    alpha: float,
    output_dir: str,
    resume: bool,
) -> dict[str, Any]:
    """One grid point (a top-level function so a process pool can pickle it)."""
    from kdistill.experiment import run_experiment

    cfg = load_config(
        config,
        [
            *overrides,
            f"distill.temperature={temperature}",
            f"distill.alpha={alpha}",
            f"output_dir={output_dir}",
        ],
    )
    result = run_experiment(cfg, resume=resume)
    student = result.summary["student"]
    return asdict(
        SweepPoint(
            temperature=temperature,
            alpha=alpha,
            output_dir=output_dir,
            test_accuracy=float(student["test_accuracy"]),
            best_test_accuracy=float(student["best_test_accuracy"]),
            seconds=float(result.summary["seconds"]),
        )
    )


def run_sweep(
    config: str | Path,
    temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    alphas: Sequence[float] = (0.5, 0.9),
    overrides: Sequence[str] = (),
    jobs: int = 1,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> SweepResult:
    """Train every (T, alpha) of the grid, then write the table, heatmap and ``best.yaml``."""
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    base = load_config(config, overrides)
    check_sweepable(base)
    if not temperatures or not alphas:
        raise ConfigError("sweep: give at least one temperature and one alpha")
    temperatures = list(dict.fromkeys(float(t) for t in temperatures))
    alphas = list(dict.fromkeys(float(a) for a in alphas))
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"sweep: alpha must be in [0, 1], got {a}")
    for t in temperatures:
        if not t > 0:
            raise ConfigError(f"sweep: temperature must be > 0, got {t}")
    root = Path(base.output_dir)
    grid = [(t, a) for t in temperatures for a in alphas]
    jobs = max(1, min(jobs, len(grid)))
    point_overrides = list(overrides)
    if jobs > 1:
        threads = max(1, (base.train.threads or torch.get_num_threads()) // jobs)
        point_overrides += [f"train.threads={threads}", "train.progress=false"]
    args = [
        (str(config), point_overrides, t, a, str(point_dir(root, t, a)), resume) for t, a in grid
    ]

    if jobs == 1:
        raw = []
        for i, job in enumerate(args, 1):
            print(f"[{i}/{len(args)}] T={job[2]:g} alpha={job[3]:g} -> {job[4]}")
            raw.append(_run_point(*job))
    else:
        print(f"sweep: {len(args)} runs, {jobs} at a time")
        context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_run_point, *job) for job in args]
            raw = []
            for job, future in zip(args, futures, strict=True):
                raw.append(future.result())
                print(f"done T={job[2]:g} alpha={job[3]:g}: {100 * raw[-1]['test_accuracy']:.2f} %")
    points = [SweepPoint(**r) for r in raw]
    best = max(points, key=lambda p: p.test_accuracy)  # first of equals, in grid order
    result = SweepResult(points, best, root)
    _write_outputs(result, base, temperatures, alphas)
    return result


def accuracy_grid(
    points: Sequence[SweepPoint], temperatures: Sequence[float], alphas: Sequence[float]
) -> list[list[float]]:
    """Final test accuracy in % as rows of T, columns of alpha (NaN where missing)."""
    by_key = {(p.temperature, p.alpha): 100 * p.test_accuracy for p in points}
    return [[by_key.get((t, a), float("nan")) for a in alphas] for t in temperatures]


def markdown_table(
    points: Sequence[SweepPoint], temperatures: Sequence[float], alphas: Sequence[float]
) -> str:
    grid = accuracy_grid(points, temperatures, alphas)
    best = max(points, key=lambda p: p.test_accuracy)
    lines = [
        "| T \\ alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |",
        "|---|" + "---:|" * len(alphas),
    ]
    for t, row in zip(temperatures, grid, strict=True):
        cells = []
        for a, value in zip(alphas, row, strict=True):
            text = "–" if value != value else f"{value:.2f} %"
            cells.append(f"**{text}**" if (t, a) == (best.temperature, best.alpha) else text)
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(
    result: SweepResult,
    base: ExperimentConfig,
    temperatures: Sequence[float],
    alphas: Sequence[float],
) -> None:
    root, best = result.output_dir, result.best
    root.mkdir(parents=True, exist_ok=True)
    epochs = base.train.epochs
    text = (
        f"# kdistill sweep: {base.student.model} taught by {base.teacher.model}\n\n"  # type: ignore[union-attr]
        f"Final test accuracy after {epochs} epoch{'s' * (epochs != 1)} "
        f"(seed {base.seed}; rows: temperature T, columns: alpha, the weight of the soft "
        "term). One seed per cell: differences within the seed-to-seed spread are noise.\n\n"
        + markdown_table(result.points, temperatures, alphas)
        + f"\nBest: T = {best.temperature:g}, alpha = {best.alpha:g} "
        f"({100 * best.test_accuracy:.2f} %), written to `best.yaml`.\n"
    )
    try:
        from kdistill import plots

        result.files["heatmap"] = plots.heatmap(
            accuracy_grid(result.points, temperatures, alphas),
            [f"{t:g}" for t in temperatures],
            [f"{a:g}" for a in alphas],
            root / "heatmap.png",
            title="final test accuracy (%)",
            row_name="temperature T",
            col_name="alpha (weight of the soft term)",
        )
        text += "\n![T × alpha heatmap](heatmap.png)\n"
    except ImportError as err:
        result.notes.append(f"heatmap skipped: {err}")
    result.files["table"] = atomic_write_text(root / "sweep.md", text)
    result.files["json"] = atomic_write_text(
        root / "sweep.json",
        json.dumps(
            {
                "temperatures": list(temperatures),
                "alphas": list(alphas),
                "points": [asdict(p) for p in result.points],
                "best": asdict(best),
            },
            indent=2,
        )
        + "\n",
    )
    cfg = base.to_dict()
    cfg["distill"]["temperature"] = best.temperature
    cfg["distill"]["alpha"] = best.alpha
    cfg["output_dir"] = str(root / "best")
    header = (
        f"# Best of `kdistill sweep` in {root}: T = {best.temperature:g}, alpha = {best.alpha:g}\n"
        f"# (final test accuracy {100 * best.test_accuracy:.2f} % after {epochs} epochs).\n"
    )
    result.files["best"] = atomic_write_text(
        root / "best.yaml", header + yaml.safe_dump(cfg, sort_keys=False)
    )
