"""The knowledge zoo on Fashion-MNIST: every method, same teacher, student, schedule and seeds.

    python bench/zoo.py                       # 12 rows × 3 seeds × 5 epochs on all 60,000 images
    python bench/zoo.py --epochs 4 --train-subset 20000 --threads 1   # the table in RESULTS.md
    python bench/zoo.py --methods KD DKD --seeds 0 --epochs 1 --train-subset 2000   # a smoke run

Like RepDistiller's CIFAR-100 table: the shipped TeacherCNN (0.87 M) teaches SmallCNN (47 k).
Every method is the hard-label cross-entropy plus the method's term, with RepDistiller's
weights (KD: alpha = 0.9, T = 4). The teacher runs once over the training set: its logits and
the tapped layers every method reads are cached in memory (float16 for feature maps), so
each run costs about what training the student alone costs. CRD draws 256 negatives per
anchor instead of RepDistiller's 16,384 (a CPU budget; the memory banks hold all 60,000
samples as in the paper). Writes the table between the
``zoo`` markers of bench/RESULTS.md (and prints it).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.checkpoint import load_weights
from kdistill.config import OptimConfig
from kdistill.data import fashion_mnist_dataset
from kdistill.data.loader import TensorBatchLoader
from kdistill.distiller import AUTO, LOGITS, Distiller, LossTerm
from kdistill.experiment import builtin_checkpoint, cache_teacher_outputs
from kdistill.losses import (
    AttentionTransferLoss,
    CorrelationCongruenceLoss,
    CRDLoss,
    DISTLoss,
    DKDLoss,
    HintLoss,
    KDLoss,
    LabelSmoothingCrossEntropy,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)
from kdistill.models import SmallCNN, TeacherCNN
from kdistill.trainer import TEACHER_PREFIX, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"

# Layers read by the feature and relation methods (names from named_modules()).
S_MAP, T_MAP = "features.5", "stage2"  # (B, 64, 7, 7) vs (B, 64, 14, 14)
S_VEC, T_VEC = "pool", "head.relu"  # (B, 64, 1, 1) vs (B, 256): penultimate embeddings


@dataclass
class Method:
    """A method is extra loss terms on top of the cross-entropy (weight ``ce_weight``)."""

    name: str
    terms: Any  # callable(num_samples, epochs) -> list[LossTerm]
    ce_weight: float = 1.0
    teacher_keys: list[str] = field(default_factory=lambda: [LOGITS])


def _methods() -> list[Method]:
    def term(
        name: str, loss: nn.Module, weight: float, student: str, teacher: str, **kw: Any
    ) -> LossTerm:
        return LossTerm(name, loss, weight, student=student, teacher=teacher, **kw)

    return [
        Method("baseline (CE)", lambda n, e: [], teacher_keys=[]),
        Method("KD", lambda n, e: [term("kd", KDLoss(4.0), 0.9, LOGITS, LOGITS)], ce_weight=0.1),
        Method(
            "KD2 (KD at T = 2, the demo's setting)",
            lambda n, e: [term("kd", KDLoss(2.0), 0.9, LOGITS, LOGITS)],
            ce_weight=0.1,
        ),
        Method(
            "FitNets",
            lambda n, e: [term("hint", HintLoss(), 100.0, S_MAP, T_MAP, adapter=AUTO)],
            teacher_keys=[T_MAP],
        ),
        Method(
            "AT",
            lambda n, e: [term("at", AttentionTransferLoss(), 1000.0, S_MAP, T_MAP)],
            teacher_keys=[T_MAP],
        ),
        Method(
            "SP",
            lambda n, e: [term("sp", SimilarityPreservingLoss(), 3000.0, S_MAP, T_MAP)],
            teacher_keys=[T_MAP],
        ),
        Method(
            "RKD", lambda n, e: [term("rkd", RKDLoss(), 1.0, S_VEC, T_VEC)], teacher_keys=[T_VEC]
        ),
        Method(
            "PKT",
            lambda n, e: [term("pkt", PKTLoss(), 30000.0, S_VEC, T_VEC)],
            teacher_keys=[T_VEC],
        ),
        Method(
            "CC",
            lambda n, e: [
                term("cc", CorrelationCongruenceLoss(), 0.02, S_VEC, T_VEC, adapter=AUTO)
            ],
            teacher_keys=[T_VEC],
        ),
        Method(
            "CRD",
            lambda n, e: [term("crd", CRDLoss(64, 256, n, num_negatives=256), 0.8, S_VEC, T_VEC)],
            teacher_keys=[T_VEC],
        ),
        Method(
            "DKD",
            lambda n, e: [
                term(
                    "dkd",
                    DKDLoss(1.0, 8.0, 4.0),
                    1.0,
                    LOGITS,
                    LOGITS,
                    warmup_epochs=max(1.0, e / 12),
                )
            ],
        ),
        Method("DIST", lambda n, e: [term("dist", DISTLoss(2.0, 2.0, 4.0), 1.0, LOGITS, LOGITS)]),
    ]


def run_method(
    method: Method,
    seed: int,
    args: argparse.Namespace,
    teacher: nn.Module,
    data: dict[str, Tensor],
    test: tuple[Tensor, Tensor],
) -> dict[str, float]:
    seed_everything(seed)
    torch.manual_seed(seed)
    student = SmallCNN()
    n = data["inputs"].shape[0]
    terms = method.terms(n, args.epochs)
    terms.append(LossTerm("ce", LabelSmoothingCrossEntropy(0.0), method.ce_weight, teacher=None))
    distiller = Distiller(student, terms, teacher if len(terms) > 1 else None)
    distiller.build_adapters(data["inputs"][:8])
    distiller.drop_teacher()  # teacher outputs come from the cache below
    keys = {"inputs", "target"} | {f"{TEACHER_PREFIX}{k}" for k in method.teacher_keys}
    train = TensorBatchLoader(
        **{k: v for k, v in data.items() if k in keys},
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        seed=seed,
    )
    evaluation = TensorBatchLoader(*test, batch_size=512)
    optim = OptimConfig(name="adamw", lr=3e-3, weight_decay=5e-4, schedule="onecycle")
    out = Path(args.output_dir) / method.name.split()[0] / f"seed{seed}"
    result = Trainer(
        distiller, train, evaluation, optim, args.epochs, out, progress=args.progress
    ).fit()
    accs = [row["test_accuracy"] for row in result.history]
    return {
        "best": max(accs),
        "last": accs[-1],
        "epoch_s": statistics.mean(r["epoch_time_s"] for r in result.history),
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [m.name.split()[0] for m in _methods()]
    parser.add_argument("--methods", nargs="+", default=names, choices=names)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--output-dir", default="runs/zoo")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    methods = [m for m in _methods() if m.name.split()[0] in args.methods]
    train = fashion_mnist_dataset("train", subset=args.train_subset, seed=0)
    test = fashion_mnist_dataset("test", subset=args.test_subset, seed=0).tensors
    teacher = TeacherCNN()
    teacher.load_state_dict(load_weights(builtin_checkpoint("fashion_mnist_teacher")))

    started = time.perf_counter()
    keys = sorted({k for m in methods for k in m.teacher_keys})
    cache = cache_teacher_outputs(teacher, keys, train.tensors[0], 512, "cpu", torch.float16)
    cache_s = time.perf_counter() - started
    data = {"inputs": train.tensors[0], "target": train.tensors[1], **cache}

    rows = []
    for method in methods:
        runs = []
        for seed in args.seeds:
            runs.append(run_method(method, seed, args, teacher, data, test))
            print(f"{method.name} seed {seed}: {runs[-1]}", flush=True)
        rows.append((method.name, runs))
    table = _table(rows, args, cache_s, len(train))
    print(table)
    if not args.no_write:
        update_section(RESULTS, "zoo", table)
    return table


def _stat(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def _table(
    rows: list[tuple[str, list[dict[str, float]]]],
    args: argparse.Namespace,
    cache_s: float,
    n_train: int,
) -> str:
    lines = [
        f"`python bench/zoo.py --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}"
        f"{f' --threads {args.threads}' if args.threads else ''}"
        f"{f' --train-subset {args.train_subset}' if args.train_subset else ''}` — commit "
        f"{_commit()}, {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. TeacherCNN (shipped, 0.87 M) → SmallCNN (47 k), {n_train} "
        f"training images, {args.epochs} epochs AdamW one-cycle lr 3e-3, batch "
        f"{args.batch_size}; test accuracy (%) mean ± std over seeds {args.seeds}. One teacher "
        f"pass cached logits and layers for all runs in {cache_s:.0f} s.",
        "",
        "| method | best epoch | last epoch | s / epoch |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in rows:
        lines.append(
            f"| {name} | {_stat([r['best'] for r in runs])} | "
            f"{_stat([r['last'] for r in runs])} | "
            f"{statistics.mean(r['epoch_s'] for r in runs):.1f} |"
        )
    return "\n".join(lines) + "\n"


def update_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name -->`` and ``<!-- /name -->`` (append if absent)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    content = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}{end}"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        content = before + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(content)


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
