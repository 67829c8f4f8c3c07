"""``kdistill sweep``: a grid of runs over any config keys and seeds, chosen on validation.

A grid is a product of values per dotted config key — list items by index, as in
``distill.terms[1].weight`` — from the command line (``--grid KEY=V1,V2,...``; every value
parsed as YAML) or a YAML grid file::

    grid:                             # the product of these values ...
      distill.terms[1].weight: [0.1, 1, 10]
    points:                           # ... then these explicit points
      - {distill.terms[1].weight: 0}

``--temperature`` and ``--alpha`` are shorthand for ``--grid distill.temperature=...`` and
``--grid distill.alpha=...``; without any grid the sweep is the classic T ∈ {1, 2, 4, 8} ×
alpha ∈ {0.5, 0.9}. Every key and value is checked by building the point's config before
anything trains, so a misspelt key fails at once with a message naming it.

A file with a ``scheme:`` section (DML, online teacher, Born-Again, auxiliary heads, Mean
Teacher, DINO, multi-teacher, semi-supervised: the files ``kdistill run`` takes) sweeps the
same way, each run that scheme's (:func:`~kdistill.schemes.runner.run_scheme`), its keys
(``scheme.mutual.alpha``) on the grid like any other.

Every (point, seed) is an ordinary :func:`~kdistill.experiment.run_experiment` written to
``<output_dir>/<point label>/`` (``.../seed<s>/`` when ``seeds`` are given); with
``jobs > 1`` they run in a process pool with the CPU threads split between them. The best
point is the one with the highest mean of the selection metric over seeds —
``val_accuracy`` when the config holds out ``data.val_size`` images, so the test set never
chooses; points whose means are equal at the table's precision are reported as a tie. The
sweep folder then holds

- ``sweep.md`` — mean ± std over seeds per point, the best in bold; with several seeds the
  paired test-accuracy difference to the first point (the baseline, if listed first),
- ``sweep.json`` — every run's figures,
- ``heatmap.png`` — for a two-key product grid (needs matplotlib),
- ``seeds.png`` — with several seeds: test accuracy per point, each seed a dot, mean ± std,
- ``best.yaml`` — the config with the best point's values, ready for ``kdistill run``.

``name`` other than ``sweep`` writes ``<name>.md``, ``<name>.json``, ``<name>-heatmap.png``,
``<name>-seeds.png`` and ``<name>-best.yaml`` instead, so that a second sweep in the same folder (e.g. the final
seeds of the chosen point next to the baseline, reusing finished runs with ``resume``) keeps
the first one's files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import statistics
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from kdistill.checkpoint import atomic_write_text
from kdistill.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    parse_yaml,
    read_config_file,
)

if TYPE_CHECKING:  # schemes import the runners; sweep loads them only when used
    from kdistill.schemes.config import SchemeConfig

T_KEY, ALPHA_KEY = "distill.temperature", "distill.alpha"
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
DEFAULT_ALPHAS = (0.5, 0.9)
METRICS = ("val_accuracy", "test_accuracy", "best_val_accuracy", "best_test_accuracy")
SHORT_NAMES = {T_KEY: "T", ALPHA_KEY: "a"}  # folder labels T2_a0.9, as before grids grew
TIE_DECIMALS = 4  # accuracies equal to 0.01 points (the table's precision) are a tie
_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


# -- the grid ------------------------------------------------------------------------------


@dataclass
class Grid:
    """A product of values per key, then explicit points; each point maps keys to values."""

    product: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)

    def expand(self) -> list[dict[str, Any]]:
        combos: list[dict[str, Any]] = [{}] if self.product else []
        for key, values in self.product.items():
            combos = [{**c, key: v} for c in combos for v in values]
        unique: list[dict[str, Any]] = []
        for point in [*combos, *self.points]:
            if point not in unique:
                unique.append(point)
        return unique

    @property
    def keys(self) -> list[str]:
        keys = list(self.product)
        for point in self.points:
            keys += [k for k in point if k not in keys]
        return keys


def parse_grid_item(item: str) -> tuple[str, list[Any]]:
    """``"distill.terms[1].weight=0.1,1,10"`` → ``("distill.terms[1].weight", [0.1, 1, 10])``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(
            f"sweep --grid {item!r}: expected KEY=V1,V2,..., e.g. distill.terms[1].weight=0.1,1,10"
        )
    _split_key(key, f"sweep --grid {item!r}")
    return key, [_parse_value(v.strip()) for v in raw.split(",")]


def read_grid_file(path: str | Path) -> Grid:
    """A YAML grid file: ``grid:`` (key → list of values) and/or ``points:`` (list of maps)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep --grid-file: {path} not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not data or set(data) - {"grid", "points"}:
        raise ConfigError(
            f"{path}: a grid file is a mapping with 'grid:' (key: [values]) and/or 'points:' "
            f"(a list of key: value maps); got {sorted(data) if isinstance(data, dict) else data!r}"
        )
    product = data.get("grid") or {}
    points = data.get("points") or []
    if not isinstance(product, dict):
        raise ConfigError(f"{path}: grid: must map each key to a list of values")
    for key, values in product.items():
        _split_key(str(key), f"{path}: grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid: {key}: expected a non-empty list of values")
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{path}: points: must be a list of non-empty key: value maps")
    for i, point in enumerate(points):
        for key in point:
            _split_key(str(key), f"{path}: points[{i}]")
    return Grid({str(k): list(v) for k, v in product.items()}, [dict(p) for p in points])


def _parse_value(raw: str) -> Any:
    try:
        return parse_yaml(raw)
    except yaml.YAMLError:
        return raw


def _split_key(key: str, where: str) -> list[str | int]:
    """``"distill.terms[1].weight"`` → ``["distill", "terms", 1, "weight"]``."""
    parts: list[str | int] = []
    for piece in key.split("."):
        match = _PART.fullmatch(piece)
        if match is None:
            raise ConfigError(
                f"{where}: {key!r} is not a config key; write dotted names with list items by "
                "index, e.g. distill.terms[1].weight"
            )
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (list items by index) in plain config data, in place."""
    parts = _split_key(key, "sweep")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        done = _dotted(parts[:i])
        if isinstance(part, int):
            if not isinstance(node, list) or not part < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(
                    f"sweep: grid key {key!r}: {done} has {size} items in the config; "
                    f"indices 0..{size - 1} exist"
                )
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"sweep: grid key {key!r}: {done} is not a section")
            if node.get(part) is None:
                if isinstance(parts[i + 1], int):
                    raise ConfigError(
                        f"sweep: grid key {key!r}: the config sets no {_dotted(parts[: i + 1])}"
                    )
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not last < len(node):
            raise ConfigError(f"sweep: grid key {key!r}: no such list item in the config")
        node[last] = value
    elif not isinstance(node, dict):
        raise ConfigError(f"sweep: grid key {key!r}: {_dotted(parts[:-1])} is not a section")
    else:
        node[last] = value


def _dotted(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "the config"


def point_data(base: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The plain config data of ``base`` with the point's values set."""
    data = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    for key, value in point.items():
        set_key(data, key, value)
    return data


def check_point(base: Mapping[str, Any], point: Mapping[str, Any]) -> ExperimentConfig:
    """Build the point's config, naming the grid key of any error."""
    data = point_data(base, point)
    try:
        cfg, scheme = build_configs(data)
    except ConfigError as err:
        values = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise ConfigError(f"sweep: grid point {values}: {err}") from None
    if scheme is not None:  # its teachers and its use of distill: are the scheme runner's
        return cfg
    hinton = [k for k in point if k in (T_KEY, ALPHA_KEY, "distill.label_smoothing")]
    if hinton and cfg.teacher is None:
        raise ConfigError(
            f"sweep: grid key {hinton[0]}: the config has no teacher: section; "
            "distill.temperature and distill.alpha need one"
        )
    if hinton and cfg.distill.terms:
        raise ConfigError(
            f"sweep: grid key {hinton[0]}: the config sets distill.terms, which do not use "
            "it; put the term's own key on the grid, e.g. distill.terms[1].weight or "
            "distill.terms[1].params.temperature"
        )
    return cfg


def point_labels(points: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """Folder names: a short name per key (the shortest unique tail) and the value."""
    names = {k: _short_name(k, keys) for k in keys}
    order = sorted(keys, key=lambda k: names[k])  # the same folder whatever the key order
    labels = []
    for point in points:
        text = "_".join(f"{names[k]}{_format(point[k])}" for k in order if k in point)
        labels.append(re.sub(r"[^A-Za-z0-9_.+-]", "-", text) or "point")
    duplicates = sorted({lab for lab in labels if labels.count(lab) > 1})
    if duplicates:  # e.g. values that differ only in characters a folder name cannot hold
        raise ConfigError(f"sweep: grid points share the folder name {duplicates[0]!r}")
    return labels


def _short_name(key: str, keys: Sequence[str]) -> str:
    """``distill.terms[1].weight`` → ``weight``, or ``terms1.weight`` when another key also
    ends in ``weight``."""
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    parts = key.split(".")
    others = ["." + k for k in keys if k != key]
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(o.endswith("." + tail) for o in others):
            break
    return re.sub(r"\[(\d+)\]", r"\1", tail)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# -- running -------------------------------------------------------------------------------


@dataclass
class SeedRun:
    """The figures of one (point, seed) run; accuracies as fractions, after the last epoch."""

    seed: int
    output_dir: str
    test_accuracy: float
    best_test_accuracy: float
    train_accuracy: float
    val_accuracy: float | None
    best_val_accuracy: float | None
    seconds: float


@dataclass
class SweepPoint:
    values: dict[str, Any]
    label: str
    runs: list[SeedRun]

    def metric(self, name: str) -> list[float]:
        return [float(getattr(r, name)) for r in self.runs if getattr(r, name) is not None]

    def mean(self, name: str) -> float:
        values = self.metric(name)
        return statistics.fmean(values) if values else math.nan

    def std(self, name: str) -> float:
        values = self.metric(name)
        return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class SweepResult:
    points: list[SweepPoint]
    best: SweepPoint
    ties: list[SweepPoint]  # every point tied for best, ``best`` first
    metric: str
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_configs(data: Mapping[str, Any]) -> tuple[ExperimentConfig, SchemeConfig | None]:
    """``(experiment, scheme)`` of a point's plain data; ``scheme`` is ``None`` for a plain
    experiment and a :class:`~kdistill.schemes.config.SchemeConfig` for a file with a
    ``scheme:`` section (the same files ``kdistill run`` takes)."""
    if "scheme" in data:
        from kdistill.schemes.config import split_scheme_dict

        return split_scheme_dict(dict(data))
    return config_from_dict(dict(data)), None


def _run_point(data: dict[str, Any], seed: int, resume: bool) -> dict[str, Any]:
    """One run (a top-level function so a process pool can pickle it)."""
    from kdistill.experiment import run_experiment
    from kdistill.schemes.runner import run_scheme

    cfg, scheme = build_configs(data)
    out = Path(cfg.output_dir)
    done = _finished(out, cfg, scheme) if resume else None
    if done is None:
        if scheme is None:
            result = run_experiment(cfg, resume=resume)
            done = result.summary, result.fit.final
        else:
            run_scheme(cfg, scheme, resume=resume)
            done = _finished(out, cfg, scheme)
            if done is None:
                raise RuntimeError(f"sweep: the scheme run in {out} left no summary or metrics")
    summary, last = done
    student = summary["student"]
    return asdict(
        SeedRun(
            seed=seed,
            output_dir=str(out),
            test_accuracy=float(student["test_accuracy"]),
            best_test_accuracy=float(student["best_test_accuracy"]),
            train_accuracy=float(last["train_accuracy"]),
            val_accuracy=student.get("val_accuracy"),
            best_val_accuracy=student.get("best_val_accuracy"),
            seconds=float(summary.get("seconds", math.nan)),
        )
    )


def _finished(
    out: Path, cfg: ExperimentConfig, scheme: SchemeConfig | None = None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A finished run of exactly this config (and scheme) in ``out``: its summary and the
    student's last epoch row (a Born-Again run's rows are in its last generation's folder,
    next to the student's weights)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        weights = summary.get("student", {}).get("weights")
        folder = Path(weights).parent if scheme is not None and weights else out
        rows = (folder / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError, AttributeError):
        return None
    if summary.get("config") != json.loads(json.dumps(cfg.to_dict())) or not rows:
        return None
    if scheme is not None and summary.get("scheme") != json.loads(json.dumps(scheme.to_dict())):
        return None
    return summary, json.loads(rows[-1])


def run_sweep(
    config: str | Path,
    grid: Grid | None = None,
    temperatures: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    metric: str | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    output_dir: str | Path | None = None,
    resume: bool = False,
    name: str = "sweep",
) -> SweepResult:
    """Train every (point, seed) of the grid, then write the table, heatmap and best config.

    ``temperatures`` / ``alphas`` add ``distill.temperature`` / ``distill.alpha`` to the
    grid; with no grid at all the sweep is T ∈ {1, 2, 4, 8} × alpha ∈ {0.5, 0.9}.
    ``seeds`` None runs the config's own seed once, in ``<output_dir>/<label>``.
    ``metric`` (one of :data:`METRICS`) defaults to ``val_accuracy`` when the config sets
    ``data.val_size``, else ``test_accuracy`` (with a note in the table). ``resume`` reads a
    finished run of the same config from its folder and continues an unfinished one.
    """
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    base = read_config_file(config, overrides)
    base_cfg, _ = build_configs(base)
    grid = _full_grid(grid, temperatures, alphas)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"sweep --name {name!r}: use letters, digits, '_', '.', '-'")
    metric = metric or ("val_accuracy" if base_cfg.data.val_size else "test_accuracy")
    if metric not in METRICS:
        raise ConfigError(f"sweep --select {metric!r}: choose one of {', '.join(METRICS)}")
    if metric.endswith("val_accuracy") and base_cfg.data.val_size is None:
        raise ConfigError(
            f"sweep --select {metric}: the config holds out no validation images; "
            "set data.val_size (e.g. --set data.val_size=5000)"
        )
    seed_list = list(dict.fromkeys(seeds)) if seeds else [base_cfg.seed]
    points = grid.expand()
    labels = point_labels(points, grid.keys)
    root = Path(base_cfg.output_dir)
    jobs = max(1, min(jobs, len(points) * len(seed_list)))
    extra: dict[str, Any] = {}
    if jobs > 1:
        extra = {
            "train.threads": max(1, (base_cfg.train.threads or torch.get_num_threads()) // jobs),
            "train.progress": False,
        }
    tasks = []  # (point index, seed, config data)
    for i, (point, label) in enumerate(zip(points, labels, strict=True)):
        check_point(base, point)
        for seed in seed_list:
            folder = root / label / f"seed{seed}" if seeds else root / label
            values = {**point, "seed": seed, "output_dir": str(folder), **extra}
            tasks.append((i, seed, point_data(base, values)))
    for _, _, data in tasks:  # each run's config is valid before anything trains
        build_configs(data)

    cache = base_cfg.distill.cache_dir
    raw = _run_all(tasks, jobs, resume, warm_first=cache is not None and not Path(cache).exists())
    results = [
        SweepPoint(
            dict(point),
            label,
            [SeedRun(**r) for (i, _, _), r in zip(tasks, raw, strict=True) if i == n],
        )
        for n, (point, label) in enumerate(zip(points, labels, strict=True))
    ]
    best_score = max(round(p.mean(metric), TIE_DECIMALS) for p in results)
    ties = [p for p in results if round(p.mean(metric), TIE_DECIMALS) == best_score]
    result = SweepResult(results, ties[0], ties, metric, root)
    if metric.startswith("test") or metric.startswith("best_test"):
        result.notes.append(
            "selected on the test set: set data.val_size to choose on held-out training images"
        )
    _write_outputs(result, base, base_cfg, grid, name)
    return result


def _full_grid(
    grid: Grid | None, temperatures: Sequence[float] | None, alphas: Sequence[float] | None
) -> Grid:
    grid = Grid(dict(grid.product), list(grid.points)) if grid is not None else Grid()
    if not grid.product and not grid.points and temperatures is None and alphas is None:
        temperatures, alphas = DEFAULT_TEMPERATURES, DEFAULT_ALPHAS
    for key, values in ((T_KEY, temperatures), (ALPHA_KEY, alphas)):
        if values is not None:
            if not values:
                raise ConfigError(f"sweep: give at least one value for {key}")
            grid.product[key] = [float(v) for v in values]
    for key, values in grid.product.items():
        grid.product[key] = [v for i, v in enumerate(values) if v not in values[:i]]
    if not grid.product and not grid.points:
        raise ConfigError("sweep: the grid is empty; give --grid KEY=V1,V2 or a --grid-file")
    return grid


def _run_all(
    tasks: list[tuple[int, int, dict[str, Any]]], jobs: int, resume: bool, warm_first: bool
) -> list[dict[str, Any]]:
    def describe(task: tuple[int, int, dict[str, Any]]) -> str:
        return task[2]["output_dir"]

    if jobs == 1:
        raw = []
        for n, task in enumerate(tasks, 1):
            print(f"[{n}/{len(tasks)}] -> {describe(task)}", flush=True)
            raw.append(_run_point(task[2], task[1], resume))
        return raw
    print(f"sweep: {len(tasks)} runs, {jobs} at a time", flush=True)
    raw: list[dict[str, Any]] = []
    if warm_first:  # the first run builds the on-disk teacher cache that the others read
        raw.append(_run_point(tasks[0][2], tasks[0][1], resume))
        print(f"done {describe(tasks[0])}", flush=True)
    context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_run_point, t[2], t[1], resume) for t in tasks[len(raw) :]]
        for task, future in zip(tasks[len(raw) :], futures, strict=True):
            raw.append(future.result())
            print(f"done {describe(task)}: test {100 * raw[-1]['test_accuracy']:.2f} %", flush=True)
    return raw


# -- the table -----------------------------------------------------------------------------


def _cell(point: SweepPoint, name: str) -> str:
    if not point.metric(name):
        return "–"
    mean = 100 * point.mean(name)
    if len(point.runs) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * point.std(name):.2f}"


def paired_differences(point: SweepPoint, reference: SweepPoint, name: str) -> list[float]:
    """``point − reference`` in points per seed both ran, in the reference's seed order."""
    mine = {r.seed: getattr(r, name) for r in point.runs}
    return [100 * (mine[r.seed] - getattr(r, name)) for r in reference.runs if r.seed in mine]


def verdict(differences: Sequence[float], spread: float = 0.0) -> str:
    """``wins`` / ``loses`` when the mean paired difference exceeds the seed spread — the
    std of the differences and ``spread`` (the arms' own seed-to-seed std), whichever is
    larger — else ``no difference``."""
    if len(differences) < 2:
        return "one seed"
    mean = statistics.fmean(differences)
    if abs(mean) <= max(statistics.stdev(differences), spread) or mean == 0:
        return "no difference"
    return "wins" if mean > 0 else "loses"


def markdown_table(result: SweepResult, keys: Sequence[str]) -> str:
    """Mean ± std over seeds per point (accuracies in %), the best (or tied) in bold."""
    has_val = any(p.metric("val_accuracy") for p in result.points)
    seeds = max(len(p.runs) for p in result.points)
    reference = result.points[0]
    columns = [*keys, "seeds"]
    columns += ["val acc. (%)"] if has_val else []
    columns += ["test acc. (%)", "train acc. (%)"]
    if seeds > 1 and len(result.points) > 1:
        columns += [f"test Δ vs {reference.label} (paired)", "verdict"]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(keys) + "---:|" * (len(columns) - len(keys)),
    ]
    selected = {id(p) for p in result.ties}
    for point in result.points:
        cells = [_format(point.values[k]) if k in point.values else "(config)" for k in keys]
        cells.append(str(len(point.runs)))
        scores = (["val_accuracy"] if has_val else []) + ["test_accuracy", "train_accuracy"]
        for name in scores:
            text = _cell(point, name)
            chosen = name == result.metric.removeprefix("best_") and id(point) in selected
            cells.append(f"**{text}**" if chosen else text)
        if len(columns) > len(cells):
            if point is reference:
                cells += ["–", "baseline"]
            else:
                diffs = paired_differences(point, reference, "test_accuracy")
                mean = statistics.fmean(diffs) if diffs else math.nan
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                spread = 100 * max(point.std("test_accuracy"), reference.std("test_accuracy"))
                cells += [f"{mean:+.2f} ± {std:.2f}", verdict(diffs, spread)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_grid(result: SweepResult, grid: Grid) -> list[list[float]]:
    """Mean selection metric in % as rows of the first key, columns of the second."""
    (k1, rows), (k2, cols) = list(grid.product.items())
    by_key = {
        (p.values.get(k1), p.values.get(k2)): 100 * p.mean(result.metric) for p in result.points
    }
    return [[by_key.get((r, c), math.nan) for c in cols] for r in rows]


def spread_plot(result: SweepResult, path: str | Path, name: str = "test_accuracy") -> Path:
    """Accuracy per point: every seed as a dot, the mean as a bar with ± std whiskers."""
    from kdistill import plots

    plt = plots.pyplot()
    labels = [p.label for p in result.points]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 2), 4))
    for x, point in enumerate(result.points):
        values = [100 * v for v in point.metric(name)]
        color = "#dd8452" if point in result.ties else "#8c8c8c"
        ax.errorbar(
            [x],
            [statistics.fmean(values)],
            yerr=[100 * point.std(name)],
            fmt="_",
            ms=18,
            color=color,
            capsize=4,
            zorder=2,
        )
        ax.scatter([x] * len(values), values, s=18, color=color, alpha=0.7, zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    seeds = max(len(p.runs) for p in result.points)
    ax.set(ylabel=f"{name.replace('_', ' ')} (%)", title=f"{seeds} seeds per point; mean ± std")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return plots._save(fig, path)


def _file(root: Path, name: str, kind: str) -> Path:
    suffix = {"md": ".md", "json": ".json", "png": "-heatmap.png", "seeds": "-seeds.png"}
    suffix["yaml"] = "-best.yaml"
    if name == "sweep":  # the names sweeps always had
        default = {"png": "heatmap.png", "seeds": "seeds.png", "yaml": "best.yaml"}
        return root / default.get(kind, f"sweep{suffix[kind]}")
    return root / f"{name}{suffix[kind]}"


def _write_outputs(
    result: SweepResult,
    base: dict[str, Any],
    base_cfg: ExperimentConfig,
    grid: Grid,
    name: str,
) -> None:
    root, best = result.output_dir, result.best
    root.mkdir(parents=True, exist_ok=True)
    epochs = base_cfg.train.epochs
    teacher = f" taught by {base_cfg.teacher.model}" if base_cfg.teacher else ""
    scheme = base.get("scheme")
    if isinstance(scheme, Mapping) and scheme.get("name"):
        teacher += f", scheme {scheme['name']}"
    d = base_cfg.data
    held = f", {d.val_size} training images held out for validation" if d.val_size else ""
    seeds = sorted({r.seed for p in result.points for r in p.runs})
    metric_text = result.metric.replace("_", " ")
    text = (
        f"# kdistill sweep: {base_cfg.student.model}{teacher}\n\n"
        f"{d.name}{held}; {epochs} epoch{'s' * (epochs != 1)}; seeds {', '.join(map(str, seeds))}. "
        f"Accuracies after the last epoch, mean ± std over seeds; chosen on {metric_text} "
        "(bold). Differences within the seed-to-seed spread are noise.\n\n"
        + markdown_table(result, grid.keys)
        + "\n"
        + _best_line(result, _file(root, name, "yaml").name)
    )
    heatmap = _file(root, name, "png")
    if len(grid.product) == 2 and not grid.points:
        try:
            from kdistill import plots

            (k1, rows), (k2, cols) = list(grid.product.items())
            result.files["heatmap"] = plots.heatmap(
                accuracy_grid(result, grid),
                [_format(v) for v in rows],
                [_format(v) for v in cols],
                heatmap,
                title=f"{metric_text} (%)",
                row_name=k1,
                col_name=k2,
            )
            text += f"\n![{k1} × {k2} heatmap]({heatmap.name})\n"
        except ImportError as err:
            result.notes.append(f"heatmap skipped: {err}")
    if max(len(p.runs) for p in result.points) > 1:
        try:
            result.files["seeds"] = spread_plot(result, _file(root, name, "seeds"))
            text += f"\n![test accuracy per seed]({result.files['seeds'].name})\n"
        except ImportError as err:
            result.notes.append(f"seed plot skipped: {err}")
    for note in result.notes:
        text += f"\nNote: {note}.\n"
    result.files["table"] = atomic_write_text(_file(root, name, "md"), text)
    result.files["json"] = atomic_write_text(
        _file(root, name, "json"),
        json.dumps(
            {
                "keys": grid.keys,
                "metric": result.metric,
                "points": [asdict(p) for p in result.points],
                "best": best.label,
                "ties": [p.label for p in result.ties],
            },
            indent=2,
        )
        + "\n",
    )
    data = point_data(base, best.values)
    data["output_dir"] = str(root / "best")
    values = ", ".join(f"{k} = {_format(v)}" for k, v in best.values.items())
    header = (
        f"# Best of `kdistill sweep` in {root}: {values}\n"
        f"# ({metric_text} {100 * best.mean(result.metric):.2f} % over {len(best.runs)} "
        f"seed{'s' * (len(best.runs) != 1)} after {epochs} epochs"
        + (
            f"; tied with {', '.join(p.label for p in result.ties[1:])}"
            if len(result.ties) > 1
            else ""
        )
        + ").\n"
    )
    result.files["best"] = atomic_write_text(
        _file(root, name, "yaml"), header + yaml.safe_dump(data, sort_keys=False)
    )


def _best_line(result: SweepResult, best_file: str) -> str:
    metric = result.metric.replace("_", " ")
    score = f"{100 * result.best.mean(result.metric):.2f} %"
    if len(result.ties) > 1:
        names = ", ".join(p.label for p in result.ties)
        return f"Tie on {metric} ({score}): {names}; `{best_file}` holds the first, {result.best.label}.\n"
    return f"Best on {metric}: {result.best.label} ({score}), written to `{best_file}`.\n"
