"""kdistill against torchdistill 1.1.5: training throughput on CPU, same everything.

    .venv/bin/python bench/vs_torchdistill.py                  # 10,000 images, 5 repeats
    .venv/bin/python bench/vs_torchdistill.py --td-python /work/tdvenv/bin/python --repeats 3

torchdistill needs torchvision, which must not go into kdistill's venv, so it runs in its own
(``python3.11 -m venv /work/tdvenv && /work/tdvenv/bin/pip install torch==2.14.1
torchvision==0.29.1 torchdistill==1.1.5 safetensors tqdm``). Every arm is a fresh subprocess
running this same file with ``--worker ARM`` (its top level imports only torch and the standard
library). The kdistill arms run twice: in the torchdistill venv (``PYTHONPATH=src``, so both
libraries use the same torch 2.14.1 — the fair comparison) and in kdistill's own venv
(torch 2.13), to show the torch version's share.

Same for every arm: the shipped Fashion-MNIST TeacherCNN (weights), SmallCNN student (the
same initial weights; both classes loaded from ``src/kdistill/models/cnn.py``, which needs only
torch), the same images and labels (written once to a ``.pt`` file), batch 128 with
``drop_last``, one epoch = the same number of steps, AdamW (lr 3e-3, weight decay 5e-4,
constant LR), gradient clipping at 5, the Hinton objective
``0.1 · CE + 0.9 · T² · KL(p_t^T ‖ p_s^T)`` at T = 2, and the same thread count.

Arms:

* ``torchdistill`` — its own training loop as in its ``examples/torchvision/
  image_classification.py`` (``pre_epoch_process``; per batch ``forward_process`` and
  ``post_forward_process`` and ``loss.item()``; its ``MetricLogger`` printing and per-step NaN
  check are left out) on a ``DistillationBox`` built by
  ``get_distillation_box`` with ``WeightedSumLoss`` over its ``KDLoss`` (alpha 0.1 on CE,
  beta 0.9 on ``T²·KL``), a ``RandomSampler`` ``DataLoader``, teacher ``requires_grad:
  False``. The live teacher runs every step, under ``torch.no_grad``.
* ``kdistill_live`` — kdistill's :class:`~kdistill.trainer.Trainer` epoch with the live
  teacher (``cache_teacher: false``).
* ``kdistill_cache`` — the Trainer epoch reading teacher logits from the on-disk cache
  (:mod:`kdistill.cache`, what ``distill.cache_dir`` does). Its one-time build (a teacher
  pass over the images) is timed once and also reported amortised into a one-epoch run.

Each arm (a fresh process) first takes 5 untimed steps (warm-up), then one timed epoch;
throughput is images trained per second of that epoch, by the wall clock and per CPU-second
of the (single-threaded) process; the latter is much less disturbed by other jobs on a shared
machine, which take wall-clock time but not this process's CPU time. Arms are interleaved in
rotated order and repeated; the table shows medians and the median of per-repeat (paired)
ratios, with the 1-minute load average, because other jobs share the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CNN_SOURCE = ROOT / "src" / "kdistill" / "models" / "cnn.py"
TEMPERATURE, ALPHA_SOFT, LR, WEIGHT_DECAY, GRAD_CLIP, BATCH = 2.0, 0.9, 3e-3, 5e-4, 5.0, 128
WARMUP_STEPS = 5
ARMS = (
    "torchdistill",
    "kdistill_live",
    "kdistill_cache",
    "kdistill_live@own",
    "kdistill_cache@own",
)
"""``@own``: run with kdistill's venv (torch 2.13) instead of the torchdistill venv."""


def cnn_module() -> Any:
    """kdistill's model definitions, loaded from their file (they import only torch)."""
    spec = importlib.util.spec_from_file_location("_shared_cnn", CNN_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models(payload: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    cnn = cnn_module()
    teacher, student = cnn.TeacherCNN(), cnn.SmallCNN()
    teacher.load_state_dict(payload["teacher"])
    student.load_state_dict(payload["student"])
    return teacher.eval(), student


# --------------------------------------------------------------------------- torchdistill


def torchdistill_epoch(payload_path: str, threads: int) -> dict[str, float]:
    """One timed epoch of torchdistill's own loop (runs inside the torchdistill venv)."""
    import logging

    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import get_distillation_box

    logging.disable(logging.INFO)
    torch.set_num_threads(threads)
    payload = torch.load(payload_path)
    teacher, student = models(payload)
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": True},
        },
        "teacher": {"sequential": [], "requires_grad": False,
                    "forward_proc": "forward_batch_only"},
        "student": {"adaptations": None, "sequential": [], "frozen_modules": [],
                    "requires_grad": True, "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": WEIGHT_DECAY},
                      "max_grad_norm": GRAD_CLIP},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": TEMPERATURE, "alpha": 1 - ALPHA_SOFT, "reduction": "batchmean",
            }}, "weight": 1.0}}},
        },
    }  # fmt: skip
    dataset = TensorDataset(payload["x"], payload["y"])
    device = torch.device("cpu")
    box = get_distillation_box(
        teacher, student, {"train": dataset}, train_config, device, None, False, 1
    )

    def steps(limit: int | None) -> tuple[int, float]:
        box.pre_epoch_process(epoch=0)
        n, loss_sum = 0, 0.0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            loss_sum += loss.item()  # the example loop logs it every step
            n += 1
            if limit is not None and n == limit:
                break
        return n, loss_sum / max(n, 1)

    steps(WARMUP_STEPS)
    start, cpu = time.perf_counter(), time.process_time()
    n, mean_loss = steps(None)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "steps": n,
        "images": n * BATCH,
        "mean_loss": mean_loss,
    }


# --------------------------------------------------------------------------- kdistill


def kdistill_epoch(payload_path: str, arm: str, cache_dir: str, threads: int) -> dict[str, float]:
    """One timed epoch of kdistill's Trainer, live teacher or on-disk cache."""
    from kdistill.cache import open_cache
    from kdistill.config import OptimConfig
    from kdistill.data.loader import TensorBatchLoader
    from kdistill.distiller import Distiller, LossTerm
    from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
    from kdistill.trainer import TEACHER_PREFIX, Trainer

    torch.set_num_threads(threads)
    payload = torch.load(payload_path)
    teacher, student = models(payload)
    x, y = payload["x"], payload["y"]
    work = Path(cache_dir).parent
    terms = [
        LossTerm("kd", KDLoss(TEMPERATURE), ALPHA_SOFT),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 1 - ALPHA_SOFT, teacher=None),
    ]
    cache = open_cache(cache_dir, teacher=teacher) if arm == "kdistill_cache" else None
    cached = {f"{TEACHER_PREFIX}logits": cache["logits"]} if cache is not None else {}
    distiller = Distiller(student, terms, None if cached else teacher)
    optim = OptimConfig(
        name="adamw", lr=LR, weight_decay=WEIGHT_DECAY, schedule="constant", grad_clip=GRAD_CLIP
    )

    def loader(n: int | None) -> TensorBatchLoader:
        rows = slice(None) if n is None else slice(0, n * BATCH)
        named = {k: v[torch.arange(x.shape[0])[rows]] for k, v in cached.items()}
        return TensorBatchLoader(
            inputs=x[rows], target=y[rows], **named, batch_size=BATCH, shuffle=True,
            drop_last=True, seed=0,
        )  # fmt: skip

    eval_loader = TensorBatchLoader(x[:BATCH], y[:BATCH], batch_size=BATCH)
    warm = Trainer(
        distiller, loader(WARMUP_STEPS), eval_loader, optim, 1, work / arm, progress=False,
        tensorboard=False,
    )  # fmt: skip
    warm.train_epoch(0)
    trainer = Trainer(
        distiller, loader(None), eval_loader, optim, 1, work / arm, progress=False,
        tensorboard=False,
    )  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    metrics = trainer.train_epoch(0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(trainer.train_loader)  # type: ignore[arg-type]
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "steps": n,
        "images": n * BATCH,
        "mean_loss": metrics["train_loss"],
    }


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--td-python", default="/work/tdvenv/bin/python")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torchdistill":
        print(json.dumps(torchdistill_epoch(args.payload, args.threads)))
        return
    if args.worker:
        print(json.dumps(kdistill_epoch(args.payload, args.worker, args.cache, args.threads)))
        return

    from kdistill.cache import build_cache
    from kdistill.config import ModelConfig
    from kdistill.data import fashion_mnist_dataset
    from kdistill.experiment import load_model

    torch.set_num_threads(args.threads)
    x, y = fashion_mnist_dataset("train", subset=args.subset, seed=0).tensors
    teacher = load_model(
        ModelConfig("teacher_cnn", checkpoint="builtin:fashion_mnist_teacher"), "teacher"
    )
    torch.manual_seed(0)
    student = load_model(ModelConfig("small_cnn"))
    work = Path(tempfile.mkdtemp(prefix="kdistill-vs-torchdistill-"))
    payload = {"x": x, "y": y, "teacher": teacher.state_dict(), "student": student.state_dict()}
    torch.save(payload, work / "payload.pt")
    version = subprocess.run(
        [args.td_python, "-c", "import torch, torchdistill; print(torch.__version__, "
         "torchdistill.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    print(
        f"# {os.cpu_count()} cores, threads {args.threads}; kdistill on torch {torch.__version__}, "
        f"torchdistill {version[1]} on torch {version[0]}; {args.subset} images, batch {BATCH}, "
        f"{args.subset // BATCH} steps"
    )
    start = time.perf_counter()
    shared_teacher, _ = models(payload)  # the class the workers load (the cache records it)
    # batch 128: this CPU runs TeacherCNN inference ~2x faster per image than at 512
    cache = build_cache(work / "cache", shared_teacher, x, data_name="bench", batch_size=BATCH)
    build_s = time.perf_counter() - start
    print(f"# kdistill disk cache built once: {build_s:.2f} s")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": str(ROOT / "src"),
    }
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    loads: list[float] = []
    for r in range(args.repeats):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            kind, _, where = arm.partition("@")
            python = sys.executable if where == "own" else args.td_python
            done = subprocess.run(
                [python, __file__, "--worker", kind, "--payload", str(work / "payload.pt"),
                 "--cache", str(cache.path), "--threads", str(args.threads)],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            if done.returncode:
                sys.exit(f"{arm} worker failed:\n{done.stdout}\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            load = os.getloadavg()[0]
            loads.append(load)
            results[arm].append(result)
            print(
                f"repeat {r}: {arm:18s} {result['images'] / result['seconds']:7.1f} img/s wall, "
                f"{result['images'] / result['cpu_s']:7.1f} img/CPU-s ({result['steps']} steps in "
                f"{result['seconds']:.2f} s, {result['cpu_s']:.2f} CPU-s; epoch-mean loss "
                f"{result['mean_loss']:.3f}; load {load:.2f})",
                flush=True,
            )

    steps = {arm: {res["steps"] for res in results[arm]} for arm in ARMS}
    assert len(set.union(*steps.values())) == 1, f"arms trained different step counts: {steps}"
    rate = {arm: [res["images"] / res["seconds"] for res in results[arm]] for arm in ARMS}
    cpu_rate = {arm: [res["images"] / res["cpu_s"] for res in results[arm]] for arm in ARMS}
    td, td_cpu = rate["torchdistill"], cpu_rate["torchdistill"]
    images = results["torchdistill"][0]["images"]
    print()
    print(
        "| arm | images/s, wall (median) | ÷ torchdistill, wall | images per CPU-second "
        "(median) | ÷ torchdistill, CPU |"
    )
    print("|---|---:|---:|---:|---:|")
    for arm in ARMS:
        ratios = [a / b for a, b in zip(rate[arm], td, strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu_rate[arm], td_cpu, strict=True)]
        print(
            f"| {arm} | {statistics.median(rate[arm]):.1f} | {statistics.median(ratios):.2f}× "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {statistics.median(cpu_rate[arm]):.1f} | "
            f"{statistics.median(cpu_ratios):.2f}× ({min(cpu_ratios):.2f}–{max(cpu_ratios):.2f}) |"
        )
    cache_s = [res["seconds"] + build_s for res in results["kdistill_cache"]]
    amortised = [images / s / b for s, b in zip(cache_s, td, strict=True)]
    print(
        f"| kdistill_cache + its one-time build (wall), 1 epoch | "
        f"{statistics.median(images / s for s in cache_s):.1f} | "
        f"{statistics.median(amortised):.2f}× | | |"
    )
    print(
        f"\nload average: median {statistics.median(loads):.2f}, max {max(loads):.2f}; "
        f"cache build {build_s:.2f} s"
    )


if __name__ == "__main__":
    main()
