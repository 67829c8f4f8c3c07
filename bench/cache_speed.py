"""KD epoch time from the on-disk teacher cache vs student-only training vs a live teacher.

    python bench/cache_speed.py                     # 10,000 Fashion-MNIST images, 5 repeats
    python bench/cache_speed.py --subset 60000 --repeats 3
    python bench/cache_speed.py --lm-tokens 2048    # LM top-k layout: bytes/token, residual mass

Shipped TeacherCNN (``builtin:fashion_mnist_teacher``) → SmallCNN, batch 128, AdamW, KD at
T = 2, alpha = 0.9 (the demo's objective). Arms, one training epoch each over the same images:

* ``student_only`` — :class:`~kdistill.trainer.Trainer` with the cross-entropy term alone
  (no teacher): the physical limit of a KD step is this.
* ``kd_disk_cache`` — the Trainer reading teacher logits from a
  :mod:`kdistill.cache` folder (memory-mapped, indexed per batch); the cache is built once
  before the repeats and its build time is printed separately.
* ``kd_live_trainer`` — the Trainer with the live teacher (``cache_teacher: false``): the
  teacher runs under ``torch.inference_mode`` every step.
* ``naive_live`` — a plain PyTorch loop with a ``DataLoader`` and a live teacher under
  ``torch.no_grad`` (what a user writes first).

Every repeat runs all arms, in a rotated order, on fresh students with the same seed; the
table gives the median over repeats, and each ratio is the median of the per-repeat ratios
(paired, which cancels some of the load that other jobs put on a shared machine). Times are
wall-clock and CPU time of this (single-threaded) process: other jobs on a shared machine
stretch the first but hardly the second. The 1-minute load average is printed next to each
measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.cache import build_cache
from kdistill.config import ModelConfig, OptimConfig
from kdistill.data import fashion_mnist_dataset
from kdistill.data.loader import TensorBatchLoader
from kdistill.distiller import Distiller, LossTerm
from kdistill.experiment import load_model
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.trainer import TEACHER_PREFIX, Trainer

TEMPERATURE, ALPHA, LR, BATCH = 2.0, 0.9, 3e-3, 128
OPTIM = OptimConfig(name="adamw", lr=LR, schedule="constant", grad_clip=5.0)
ARMS = ("student_only", "kd_disk_cache", "kd_live_trainer", "naive_live")


def teacher_and_student(seed: int) -> tuple[nn.Module, nn.Module]:
    teacher = load_model(
        ModelConfig("teacher_cnn", checkpoint="builtin:fashion_mnist_teacher"), "teacher"
    )
    torch.manual_seed(seed)
    return teacher.eval(), load_model(ModelConfig("small_cnn"))


def kd_terms() -> list[LossTerm]:
    return [
        LossTerm("kd", KDLoss(TEMPERATURE), ALPHA),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 1 - ALPHA, teacher=None),
    ]


def trainer_epoch(
    distiller: Distiller, loader: TensorBatchLoader, out: Path, eval_loader: TensorBatchLoader
) -> tuple[float, float]:
    trainer = Trainer(
        distiller, loader, eval_loader, OPTIM, 1, out, progress=False, tensorboard=False
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train_epoch(0)
    return time.perf_counter() - start, time.process_time() - cpu


def naive_epoch(
    teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor
) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=OPTIM.weight_decay)
    teacher.eval()
    student.train()
    start, cpu = time.perf_counter(), time.process_time()
    for xb, yb in loader:
        with torch.no_grad():
            t_logits = teacher(xb)
        s_logits = student(xb)
        kd = F.kl_div(
            F.log_softmax(s_logits / TEMPERATURE, -1),
            F.softmax(t_logits / TEMPERATURE, -1),
            reduction="batchmean",
        )
        loss = ALPHA * TEMPERATURE**2 * kd + (1 - ALPHA) * F.cross_entropy(s_logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
    return time.perf_counter() - start, time.process_time() - cpu


def lm_bytes_per_token(tokens: int, threads: int) -> None:
    """Top-k cache of the real SmolLM2-135M teacher over Python's docs: size and residual mass."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kdistill.data.text import load_pydoc_topics
    from kdistill.lm.pretrained import load_smollm2

    torch.set_num_threads(threads)
    teacher, tokenizer = load_smollm2()
    text = "\n\n".join(load_pydoc_topics())
    seq = 256
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : tokens // seq * seq].view(-1, seq)
    work = Path(tempfile.mkdtemp(prefix="kdistill-lm-cache-"))
    vocab = teacher.config.vocab_size
    print(f"# SmolLM2-135M-Instruct teacher, vocab {vocab}, {ids.numel()} tokens of pydoc topics")
    print(
        "| k | values | ids | bytes/token (tensors) | bytes/token (files on disk) | build s "
        "| mass outside top-k: mean / median / p95 / max | max abs err of stored log p |"
    )
    print("|---:|---|---|---:|---:|---:|---|---:|")
    with torch.inference_mode():
        exact = torch.log_softmax(teacher(ids[:2]).logits.float(), -1)  # (2, T, V)
    for k in (32, 64):
        for values_dtype in (torch.float16, torch.bfloat16):
            start = time.perf_counter()
            cache = build_cache(
                work / f"k{k}-{values_dtype}", teacher, ids, data_name="pydoc_topics",
                k=k, batch_size=2, values_dtype=values_dtype,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            on_disk = sum(f.stat().st_size for f in cache.path.iterdir())
            rest = cache["rest_log_mass"].to_tensor().exp().flatten()
            stored = cache["topk_values"][torch.arange(2)].float()
            true = exact.gather(-1, cache["topk_indices"][torch.arange(2)].long())
            print(
                f"| {k} | {str(values_dtype).split('.')[-1]} | "
                f"{cache.manifest['tensors']['topk_indices']['dtype']} | "
                f"{cache.bytes_per_row() / seq:.0f} | {on_disk / ids.numel():.1f} | "
                f"{seconds:.0f} | {rest.mean():.4f} / {rest.median():.4f} / "
                f"{rest.quantile(0.95):.4f} / {rest.max():.4f} | "
                f"{(stored - true).abs().max():.4f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=10_000, help="training images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lm-tokens", type=int, default=0, help="instead: LM top-k cache size for N tokens"
    )
    args = parser.parse_args()
    if args.lm_tokens:
        lm_bytes_per_token(args.lm_tokens, args.threads)
        return
    torch.set_num_threads(args.threads)

    train = fashion_mnist_dataset("train", subset=args.subset, seed=args.seed)
    test = fashion_mnist_dataset("test", subset=512, seed=args.seed)
    x, y = train.tensors
    eval_loader = TensorBatchLoader(*test.tensors, batch_size=512)
    teacher, _ = teacher_and_student(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kdistill-cache-speed-"))

    start = time.perf_counter()
    cache = build_cache(
        work / "cache", teacher, x, data_name=f"fashion_mnist:train:{args.subset}", batch_size=BATCH
    )  # batch 128: this CPU runs TeacherCNN inference ~2x faster per image than at 512
    build_s = time.perf_counter() - start
    logits = cache["logits"]
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{args.threads}; {args.subset} images, batch {BATCH}, {args.subset // BATCH} steps/epoch"
    )
    print(
        f"# disk cache built once: {build_s:.2f} s ({cache.bytes_per_row()} B/image, "
        f"{len(cache.manifest['shards'])} shard(s)) at {work / 'cache'}"
    )

    def arm(name: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            teacher, student = teacher_and_student(args.seed)
            out = work / name
            if name == "naive_live":
                return naive_epoch(teacher, student, x, y)
            common = dict(batch_size=BATCH, shuffle=True, drop_last=True, seed=args.seed)
            if name == "student_only":
                hard = [LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 1.0, teacher=None)]
                loader = TensorBatchLoader(inputs=x, target=y, **common)
                return trainer_epoch(Distiller(student, hard), loader, out, eval_loader)
            if name == "kd_disk_cache":
                cached = {f"{TEACHER_PREFIX}logits": logits}
                loader = TensorBatchLoader(inputs=x, target=y, **cached, **common)  # type: ignore[arg-type]
                return trainer_epoch(Distiller(student, kd_terms()), loader, out, eval_loader)
            loader = TensorBatchLoader(inputs=x, target=y, **common)
            return trainer_epoch(Distiller(student, kd_terms(), teacher), loader, out, eval_loader)

        return run

    runs = {name: arm(name) for name in ARMS}
    runs["student_only"]()  # untimed warm-up epoch (allocator, oneDNN kernels)
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    cpu_times: dict[str, list[float]] = {name: [] for name in ARMS}
    loads: list[float] = []
    for r in range(args.repeats):
        order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
        for name in order:
            seconds, cpu = runs[name]()
            load = os.getloadavg()[0]
            times[name].append(seconds)
            cpu_times[name].append(cpu)
            loads.append(load)
            print(
                f"repeat {r}: {name:16s} {seconds:7.2f} s wall, {cpu:7.2f} CPU-s (load {load:.2f})",
                flush=True,
            )

    print()
    print(
        "| arm | epoch wall time (median) | ÷ student-only, wall | epoch CPU time (median) "
        "| ÷ student-only, CPU |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in ARMS:
        ratios = [t / b for t, b in zip(times[name], times["student_only"], strict=True)]
        cpu_ratios = [
            t / b for t, b in zip(cpu_times[name], cpu_times["student_only"], strict=True)
        ]
        print(
            f"| {name} | {statistics.median(times[name]):.2f} s | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | "
            f"{statistics.median(cpu_times[name]):.2f} s | {statistics.median(cpu_ratios):.3f} "
            f"({min(cpu_ratios):.3f}–{max(cpu_ratios):.3f}) |"
        )
    print(
        f"\nload average during the run: median {statistics.median(loads):.2f}, "
        f"max {max(loads):.2f}; cache build {build_s:.2f} s wall once "
        f"(= {build_s / statistics.median(times['student_only']):.2f} student-only epochs)"
    )


if __name__ == "__main__":
    main()
