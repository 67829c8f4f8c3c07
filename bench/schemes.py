"""The distillation schemes on Fashion-MNIST: each one against its baseline, over seeds.

    python bench/schemes.py --seeds 0 1 2 --threads 1          # every scheme, the protocol below
    python bench/schemes.py --schemes dml born_again --seeds 0 --epochs 1 --train-subset 2000
    python bench/schemes.py --table-only ...                   # rebuild the tables from the runs

Every arm is an ordinary run of a shipped example, ``kdistill run examples/schemes/<name>.yaml
--set ...``, executed in this process through :func:`kdistill.cli.main`; the figures are read
back from the run's ``summary.json``, so they come from the code users run. Each arm of each
seed lives in ``<output-dir>/<arm>/seed<S>`` with a ``bench.json`` holding its command and
wall-clock time; an arm whose folder already holds a finished run of the same command is
reused, not retrained — so several processes over disjoint ``--schemes`` (or an interrupted
run) merge with ``--table-only``.

Two protocols, the same for every arm compared with each other:

* **subset** (mutual learning, online teacher, Born-Again, auxiliary heads, DINO,
  multi-teacher): ``--train-subset`` stratified training images (drawn per seed),
  ``--epochs`` epochs, no data augmentation (so that teacher outputs can be cached, as the
  examples do), SmallCNN students, all 10,000 test images. The baseline is
  ``examples/schemes/baseline.yaml``: the same SmallCNN from the same initialisation on the
  labels alone.
* **labels** (Mean Teacher, semi-supervised KD): all 60,000 training images with 5 % of the
  labels (3,000, stratified per seed), ``--label-epochs`` epochs over the 60,000. The
  baseline trains the same student on the same 3,000 labelled images alone
  (``data.train_subset: 3000`` draws exactly the images ``labelled_fraction: 0.05`` keeps)
  for 20 × ``--label-epochs`` epochs: as many optimizer steps as semi-supervised KD takes.
  Mean Teacher fills half of each batch with labelled images (``labelled_share: 0.5``: each
  labelled image 19 times per epoch of 114,000), so it sees the labelled images as often as
  the baseline does (19 vs 20 times per label-epoch) plus the 57,000 unlabelled ones. The
  baseline is not augmented, like the KD student; Mean Teacher's views are shifted/flipped.

Prints one Markdown table per scheme (mean ± std over the seeds, the paired per-seed
difference to the baseline row) and writes them to ``--markdown`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path("examples/schemes")
LABELLED_FRACTION = 0.05  # the examples' labelled_fraction
LABELLED = 3000  # 5 % of Fashion-MNIST's 60,000 training images
TEACHER = "{model: teacher_cnn, checkpoint: 'builtin:fashion_mnist_teacher'}"
MLP_TEACHER = "{model: mlp, kwargs: {hidden: [512, 256]}}"


@dataclass(frozen=True)
class Arm:
    """One training run per seed: an example file and its ``--set`` overrides.

    ``overrides(args)`` gives the arm's own overrides; the protocol's (seed, output folder,
    epochs, subset, threads) are added by :func:`command`.
    """

    config: str  # file name under examples/schemes
    protocol: Literal["subset", "labels"]
    overrides: Callable[[argparse.Namespace], list[str]] = lambda args: []


ARMS: dict[str, Arm] = {
    "baseline": Arm("baseline.yaml", "subset"),
    "dml": Arm("dml.yaml", "subset", lambda a: ["data.augment=false"]),
    "online_teacher": Arm("online_teacher.yaml", "subset", lambda a: ["data.augment=false"]),
    "born_again": Arm(
        "born_again.yaml", "subset", lambda a: [f"scheme.born_again.generations={a.generations}"]
    ),
    "aux_heads": Arm("aux_heads.yaml", "subset", lambda a: ["data.augment=false"]),
    "dino": Arm("dino.yaml", "subset"),
    "single_teacher": Arm(
        "multi_teacher.yaml",
        "subset",
        lambda a: [
            f"scheme.multi_teacher.teachers=[{TEACHER}]",
            "scheme.multi_teacher.weights=null",
        ],
    ),
    "multi_teacher": Arm(
        "multi_teacher.yaml",
        "subset",
        lambda a: [
            f"scheme.multi_teacher.teachers=[{TEACHER}, {MLP_TEACHER}]",
            "scheme.multi_teacher.weights=[2, 1]",
            f"scheme.multi_teacher.pretrain_epochs={a.epochs}",
        ],
    ),
    "labelled_only": Arm(
        "baseline.yaml", "labels", lambda a: [f"data.train_subset={LABELLED}", "data.augment=false"]
    ),
    "mean_teacher": Arm(
        "mean_teacher.yaml",
        "labels",
        lambda a: [
            "scheme.mean_teacher.labelled_share=0.5",
            f"scheme.mean_teacher.ramp_up_epochs={a.ramp_up_epochs}",
        ],
    ),
    "mean_teacher_ce": Arm(  # the ablation: the same batches and views, no consistency
        "mean_teacher.yaml",
        "labels",
        lambda a: [
            "scheme.mean_teacher.labelled_share=0.5",
            "scheme.mean_teacher.consistency_weight=0",
        ],
    ),
    "semi_supervised": Arm(
        "semi_supervised.yaml",
        "labels",
        lambda a: [f"scheme.semi_supervised.teacher_epochs={a.teacher_epochs}"],
    ),
}


@dataclass(frozen=True)
class Row:
    """A table row: a number read from one arm's ``summary.json``."""

    label: str
    arm: str
    read: Callable[[dict[str, Any]], float | None]
    compare: bool = True  # show the paired difference to the first row


def _student(summary: dict[str, Any]) -> float:
    return summary["student"]["test_accuracy"]


def _path(*keys: Any) -> Callable[[dict[str, Any]], Any]:
    def read(summary: dict[str, Any]) -> Any:
        node: Any = summary
        for key in keys:
            node = node[key]
        return node

    return read


@dataclass(frozen=True)
class Scheme:
    """A comparison: the first row is the reference of the differences."""

    title: str
    rows: Callable[[argparse.Namespace], list[Row]]
    note: str = ""


ALONE = "SmallCNN alone (labels only)"

SCHEMES: dict[str, Scheme] = {
    "dml": Scheme(
        "Deep mutual learning (two SmallCNN peers)",
        lambda a: [
            Row(ALONE, "baseline", _student),
            Row("DML peer 0 (the student)", "dml", _student),
            Row("DML peer 1", "dml", _path("peers", 1, "test_accuracy")),
        ],
        "Peer 0 starts from the baseline's initialisation (same seed), so the difference is paired.",
    ),
    "online_teacher": Scheme(
        "Online teacher (TeacherCNN trained alongside the SmallCNN student)",
        lambda a: [
            Row(ALONE, "baseline", _student),
            Row("student taught online", "online_teacher", _student),
            Row(
                "TeacherCNN trained online",
                "online_teacher",
                _path("teacher", "test_accuracy"),
                compare=False,
            ),
        ],
    ),
    "born_again": Scheme(
        "Born-Again networks (SmallCNN → SmallCNN)",
        lambda a: (
            [
                Row(
                    "generation 0 (labels only)",
                    "born_again",
                    _path("generations", 0, "test_accuracy"),
                )
            ]
            + [
                Row(f"generation {k}", "born_again", _path("generations", k, "test_accuracy"))
                for k in range(1, a.generations + 1)
            ]
            + [
                Row(
                    f"ensemble of generations 1..{a.generations}",
                    "born_again",
                    _path("generations", a.generations, "ensemble_test_accuracy"),
                )
            ]
        ),
        "Generation k + 1 is distilled (KD, T = 4, alpha = 0.9) from generation k's final "
        "weights; every generation starts from the same initialisation.",
    ),
    "aux_heads": Scheme(
        "Deep-to-shallow self-distillation (auxiliary heads on a SmallCNN)",
        lambda a: [
            Row(ALONE, "baseline", _student),
            Row("with auxiliary heads: final head", "aux_heads", _student),
            Row("head on features.1", "aux_heads", _path("heads", "features.1"), compare=False),
            Row("head on features.3", "aux_heads", _path("heads", "features.3"), compare=False),
        ],
    ),
    "mean_teacher": Scheme(
        "Mean Teacher with 5 % of the labels",
        lambda a: [
            Row("SmallCNN on the labelled 5 % alone", "labelled_only", _student),
            Row("Mean Teacher: student", "mean_teacher", _student),
            Row("Mean Teacher: EMA teacher", "mean_teacher", _path("ema_teacher", "test_accuracy")),
            Row("same run, consistency weight 0: student", "mean_teacher_ce", _student),
        ],
        "The last row is Mean Teacher's run without its consistency term (the same mixed "
        "batches, views and steps): the part of the gap that is the protocol, not the term.",
    ),
    "dino": Scheme(
        "DINO without labels: 20-NN accuracy of the SmallCNN's pooled features",
        lambda a: [
            Row("random initialisation", "dino", _path("knn", "random_init")),
            Row("DINO-trained student backbone", "dino", _path("knn", "student")),
            Row("DINO EMA teacher backbone", "dino", _path("knn", "ema_teacher")),
        ],
        "k-NN bank: the run's training images with their labels (labels are used only here); "
        "the random initialisation is the same network before training.",
    ),
    "multi_teacher": Scheme(
        "Multi-teacher KD (TeacherCNN + MLP teacher → SmallCNN)",
        lambda a: [
            Row("SmallCNN alone (no KD)", "baseline", _student),
            Row("KD from the TeacherCNN alone", "single_teacher", _student),
            Row("KD from TeacherCNN + MLP (weights 2 : 1)", "multi_teacher", _student),
            Row(
                "the MLP teacher itself",
                "multi_teacher",
                _path("teacher", "teachers", 1, "test_accuracy"),
                compare=False,
            ),
            Row(
                "the two-teacher ensemble itself",
                "multi_teacher",
                _path("teacher", "test_accuracy"),
                compare=False,
            ),
        ],
    ),
    "semi_supervised": Scheme(
        "Semi-supervised KD with 5 % of the labels",
        lambda a: [
            Row("SmallCNN on the labelled 5 % alone", "labelled_only", _student),
            Row("SmallCNN taught on all images", "semi_supervised", _student),
            Row(
                "TeacherCNN trained on the 5 %",
                "semi_supervised",
                _path("teacher", "test_accuracy"),
                compare=False,
            ),
        ],
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4, help="subset protocol: epochs")
    parser.add_argument(
        "--train-subset", type=int, default=10000, help="subset protocol: training images"
    )
    parser.add_argument(
        "--label-epochs", type=int, default=1, help="labels protocol: epochs over 60,000 images"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=5,
        help="semi-supervised: epochs of the TeacherCNN on the 3,000 labelled images",
    )
    parser.add_argument("--generations", type=int, default=2, help="Born-Again generations")
    parser.add_argument(
        "--ramp-up-epochs", type=float, default=None, help="Mean Teacher (default: label-epochs/2)"
    )
    parser.add_argument("--threads", type=int, default=None, help="train.threads of every run")
    parser.add_argument("--output-dir", default="runs/bench_schemes")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--table-only", action="store_true", help="read finished runs, train none")
    parser.add_argument("--force", action="store_true", help="retrain arms that finished before")
    args = parser.parse_args(argv)
    for name in ("epochs", "train_subset", "label_epochs", "teacher_epochs", "generations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ramp_up_epochs is None:
        args.ramp_up_epochs = args.label_epochs / 2
    return args


def arms_of(schemes: Sequence[str], args: argparse.Namespace) -> list[str]:
    """The arms the schemes need, each once, in :data:`ARMS` order."""
    needed = {row.arm for name in schemes for row in SCHEMES[name].rows(args)}
    return [arm for arm in ARMS if arm in needed]


def run_dir(args: argparse.Namespace, arm: str, seed: int | str) -> Path:
    return Path(args.output_dir) / arm / f"seed{seed}"


def command(arm: str, seed: int | str, args: argparse.Namespace) -> list[str]:
    """The ``kdistill run`` arguments of one arm and seed (``seed`` may be a placeholder)."""
    spec = ARMS[arm]
    sets = [f"seed={seed}", f"output_dir={run_dir(args, arm, seed)}"]
    if spec.protocol == "subset":
        sets += [f"data.train_subset={args.train_subset}", f"train.epochs={args.epochs}"]
    else:
        epochs = args.label_epochs
        if spec.config == "baseline.yaml":  # the labelled 5 % alone: as many steps
            epochs = round(args.label_epochs / LABELLED_FRACTION)
        sets += [f"train.epochs={epochs}"]
    sets += spec.overrides(args)
    if args.threads:
        sets.append(f"train.threads={args.threads}")
    sets.append("train.progress=false")
    return ["run", str(EXAMPLES / spec.config)] + [x for s in sets for x in ("--set", s)]


def shell(arm: str, seed: int | str, args: argparse.Namespace) -> str:
    return "kdistill " + shlex.join(command(arm, seed, args))


def load_run(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this command, with its wall time; else None."""
    folder = run_dir(args, arm, seed)
    try:
        meta = json.loads((folder / "bench.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("command") != shell(arm, seed, args):
        return None
    return {**summary, "_wall_s": meta["wall_s"], "_commit": meta.get("commit", "unknown")}


def train_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``kdistill run`` for one arm and seed in this process; its summary."""
    from kdistill.cli import main as kdistill

    folder = run_dir(args, arm, seed)
    if folder.exists():  # a run of another command, or one cut short: start afresh
        shutil.rmtree(folder)
    started = time.perf_counter()
    argv = command(arm, seed, args)
    argv[1] = str(ROOT / argv[1])  # the example, wherever this runs from
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the results
        code = kdistill(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{shell(arm, seed, args)} failed with exit code {code}")
    meta = {"command": shell(arm, seed, args), "wall_s": wall, "commit": _commit()}
    (folder / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    run = load_run(arm, seed, args)
    assert run is not None
    return run


def stat(values: Sequence[float]) -> str:
    """``mean ± std`` in percent (sample std; 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def scheme_table(
    scheme: Scheme, args: argparse.Namespace, runs: dict[tuple[str, int], dict[str, Any]]
) -> str:
    """One scheme's Markdown: the commands, then a row per :class:`Row` over the seeds."""
    rows = scheme.rows(args)
    arms = list(dict.fromkeys(row.arm for row in rows))
    seeds = [s for s in args.seeds if all((arm, s) in runs for arm in arms)]
    lines = [f"#### {scheme.title}", ""]
    for arm in arms:
        lines.append(f"- `{shell(arm, 'S', args)}`")
    lines.append("")
    if not seeds:
        return "\n".join([*lines, "(no seed has finished every arm yet)", ""])
    lines += [
        f"Seeds {', '.join(map(str, seeds))}; test accuracy (%) on the 10,000 test images, "
        "last epoch." + (f" {scheme.note}" if scheme.note else ""),
        "",
        "| | mean ± std | per seed | Δ vs first row (points) | s / run |",
        "|---|---:|---:|---:|---:|",
    ]
    reference = [rows[0].read(runs[rows[0].arm, s]) for s in seeds]
    for i, row in enumerate(rows):
        values = [row.read(runs[row.arm, s]) for s in seeds]
        per_seed = ", ".join(f"{100 * v:.2f}" for v in values)
        delta = "—"
        if i > 0 and row.compare:
            delta = stat([v - r for v, r in zip(values, reference, strict=True)])
            delta = delta if delta.startswith("-") else "+" + delta
        seconds = statistics.mean(runs[row.arm, s]["_wall_s"] for s in seeds)
        lines.append(f"| {row.label} | {stat(values)} | {per_seed} | {delta} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, commits: Sequence[str]) -> str:
    """The command line, the commits the runs were trained at, and the protocols."""
    seeds = " ".join(map(str, args.seeds))
    return (
        f"`python bench/schemes.py --schemes {' '.join(args.schemes)} --seeds {seeds} "
        f"--epochs {args.epochs} --train-subset {args.train_subset} --label-epochs "
        f"{args.label_epochs} --teacher-epochs {args.teacher_epochs}"
        f"{f' --threads {args.threads}' if args.threads else ''}` — runs trained at commit "
        f"{', '.join(sorted(set(commits))) or _commit()}, "
        f"{platform.machine()}, torch {torch.__version__}. Subset protocol: "
        f"{args.train_subset} stratified training images, epochs: {args.epochs}, no "
        f"augmentation. Labels protocol: all 60,000 images, 3,000 labelled, epochs: "
        f"{args.label_epochs} (the labelled-only baseline: "
        f"{round(args.label_epochs / LABELLED_FRACTION)} epochs of the 3,000). AdamW one-cycle "
        "lr 3e-3 unless the example says otherwise. `S` is the seed.\n"
    )


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = arms_of(args.schemes, args)
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in args.seeds:  # seed-major: every scheme gets a first figure early
        for arm in arms:
            run = None if args.force else load_run(arm, seed, args)
            if run is None and not args.table_only:
                print(f"running {arm} seed {seed}: {shell(arm, seed, args)}", flush=True)
                run = train_arm(arm, seed, args)
                print(f"{arm} seed {seed}: {run['_wall_s']:.0f} s", flush=True)
            if run is not None:
                runs[arm, seed] = run
    text = "\n".join(
        [header(args, [run["_commit"] for run in runs.values()])]
        + [scheme_table(SCHEMES[name], args, runs) for name in args.schemes]
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return text


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
