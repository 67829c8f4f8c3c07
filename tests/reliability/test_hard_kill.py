"""Hard-kill parity: SIGKILL a training process mid-epoch, resume it, get the same run.

A child process (forked from a forkserver that has torch imported, so each start costs
milliseconds instead of seconds; a real, separate process all the same) trains a tiny MLP student (with dropout, shuffling, a random augmentation
drawn from the loader's generator, a cosine LR schedule and a checkpoint every 3 steps) and
prints one line per optimizer step: the global step and a digest of the batch it trained
on. The parent kills it with SIGKILL at a fixed, randomly drawn point (mid-epoch, possibly
during a checkpoint save), resumes it in a new process (killing that one too in the
"twice" case), and checks against an uninterrupted run that

- the final student weights are ``torch.equal``,
- ``steps.jsonl`` (the per-step loss series) and the per-epoch metrics are equal,
- every global step trained on exactly the same samples (batch digests equal).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import multiprocessing.context
import random
import runpy
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kdistill.checkpoint import latest_checkpoint, load_weights
from kdistill.data.loader import TensorBatchLoader, random_shift_flip

STEPS_PER_EPOCH, EPOCHS = 8, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS

SCRIPT = r'''
"""Tiny distillation run used by tests/reliability/test_hard_kill.py."""
import hashlib
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from kdistill.config import OptimConfig
from kdistill.data.loader import TensorBatchLoader
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.trainer import Trainer

DIM, CLASSES, N, BATCH, EPOCHS = 12, 4, 96, 12, 3


def jitter(batch, generator):
    return batch + 0.1 * torch.randn(batch.shape, generator=generator)


class Recording(Distiller):
    def forward(self, inputs, target=None, teacher_outputs=None, index=None):
        digest = hashlib.sha256(inputs.numpy().tobytes() + target.numpy().tobytes())
        self.digest = digest.hexdigest()[:16]
        return super().forward(inputs, target, teacher_outputs, index)


class Reporting(Trainer):
    report = staticmethod(print)
    delay = 0.0

    def _step(self, out, epoch, step):
        applied = super()._step(out, epoch, step)
        global_step = epoch * self.steps_per_epoch + step + 1
        self.report(f"step {global_step} {self.distiller.digest}\n")
        if self.delay:
            time.sleep(self.delay)
        return applied


def main(output_dir, resume=False, delay=0.0, report=None):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(CLASSES, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    x = centres[y] + torch.randn(N, DIM, generator=g)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    torch.manual_seed(2)
    student = nn.Sequential(
        nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES)
    )
    terms = [
        LossTerm("kd", KDLoss(2.0), 0.7),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.1), 0.3, teacher=None),
    ]
    train = TensorBatchLoader(
        x, y, batch_size=BATCH, shuffle=True, augment=jitter, drop_last=True, seed=3
    )
    test = TensorBatchLoader(x[:32], y[:32], batch_size=32)
    optim = OptimConfig(name="adamw", lr=1e-2, schedule="cosine", grad_clip=1.0)
    config = {"optim": {"lr": 1e-2, "schedule": "cosine"}, "train": {"epochs": EPOCHS}}
    trainer = Reporting(
        Recording(student, terms, teacher), train, test, optim, EPOCHS, output_dir,
        progress=False, config=config, checkpoint_every=3,
    )
    trainer.delay = delay
    if report is not None:
        trainer.report = report
    torch.manual_seed(3)  # dropout stream
    return trainer.fit(resume=resume)


if __name__ == "__main__":
    output_dir, mode, delay, progress = globals().get("ARGS") or sys.argv[1:]
    with open(progress, "a", buffering=1) as log:
        try:
            main(output_dir, resume=mode == "resume", delay=float(delay), report=log.write)
        except BaseException:
            Path(progress).with_suffix(".error").write_text(traceback.format_exc())
            raise
'''

DELAY = 0.02  # seconds per step in processes that get killed, so the kill lands mid-run


def _kill_points(name: str, kills: int) -> list[int]:
    """``kills`` increasing global steps, each strictly inside an epoch (fixed seed)."""
    rng = random.Random(f"hard-kill-{name}")
    points: list[int] = []
    while len(points) < kills:
        epoch, step = rng.randrange(EPOCHS), rng.randrange(1, STEPS_PER_EPOCH)
        point = epoch * STEPS_PER_EPOCH + step
        # a few steps of margin so that even a slow parent kills the child before it ends
        if point <= TOTAL - 5 and all(abs(point - p) > 2 for p in points):
            points.append(point)
    return sorted(points)


CASES = {"once": _kill_points("once", 1), "twice": _kill_points("twice", 2)}


def _write_script(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_run.py"
    path.write_text(SCRIPT)
    return path


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("kdistill_tiny_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    """The uninterrupted run (in this process: same code, one thread, CPU)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    module = _import(_write_script(folder))
    lines: list[str] = []
    module.main(folder / "run", report=lambda line: lines.append(line.strip()))
    return folder / "run", _digests(lines)


def _digests(lines: list[str]) -> dict[int, str]:
    """``{global step: batch digest}``; a step trained again must see the same batch."""
    seen: dict[int, str] = {}
    for line in lines:
        _, step, digest = line.split()
        assert seen.setdefault(int(step), digest) == digest, f"step {step} saw another batch"
    return seen


def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "kdistill.trainer", "kdistill.losses"])
    return ctx


def _start(script: Path, run: Path, mode: str, delay: float, progress: Path) -> BaseProcess:
    args = (str(run), mode, str(delay), str(progress))
    child = _context().Process(
        target=runpy.run_path,
        args=(str(script),),
        kwargs={"init_globals": {"ARGS": args}, "run_name": "__main__"},
    )
    child.start()
    return child


def _lines(progress: Path) -> list[str]:
    text = progress.read_text() if progress.exists() else ""
    return [line for line in text.split("\n")[:-1]]  # complete lines only


def _error(progress: Path) -> str:
    error = progress.with_suffix(".error")
    return error.read_text() if error.exists() else ""


def _run_until_killed(
    script: Path, run: Path, resume: bool, kill_at: int, rng: random.Random, progress: Path
) -> list[str]:
    """Start the child and SIGKILL it just after it reports step ``kill_at``."""
    child = _start(script, run, "resume" if resume else "fresh", DELAY, progress)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.is_alive():
            lines = _lines(progress)
            if lines and int(lines[-1].split()[1]) >= kill_at:
                time.sleep(rng.uniform(0.0, 1.5 * DELAY))  # anywhere in the next step or save
                child.kill()  # SIGKILL
                break
            time.sleep(0.001)
    finally:
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, (child.exitcode, _error(progress))
    return _lines(progress)


def _steps(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def _epoch_metrics(run: Path) -> list[tuple[object, ...]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "train_loss", "train_kd_loss", "train_accuracy", "lr", "test_loss")
    return [tuple(row[k] for k in keys) for row in rows]


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run_bit_for_bit(
    case: str, tmp_path: Path, reference: tuple[Path, dict[int, str]]
) -> None:
    reference_run, reference_digests = reference
    script = _write_script(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(f"offsets-{case}")
    lines: list[str] = []
    resumed_from = []
    for i, kill_at in enumerate(CASES[case]):
        progress = tmp_path / f"progress-{i}.txt"
        lines += _run_until_killed(script, run, i > 0, kill_at, rng, progress)
        assert not (run / "student.safetensors").exists(), "the kill came after the run ended"
        folder = latest_checkpoint(run / "checkpoints")  # None: killed before the first one
        resumed_from.append(folder.name if folder else "scratch")
    assert any("-step-" in name for name in resumed_from), resumed_from  # a mid-epoch resume

    progress = tmp_path / "progress-final.txt"
    final = _start(script, run, "resume", 0.0, progress)
    final.join(timeout=120)
    assert final.exitcode == 0, _error(progress)
    lines += _lines(progress)

    assert _digests(lines) == reference_digests  # same samples, same augmentation, per step
    expected = load_weights(reference_run / "student.safetensors")
    got = load_weights(run / "student.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert _steps(run) == _steps(reference_run)
    assert [row["global_step"] for row in _steps(run)] == list(range(TOTAL))
    assert _epoch_metrics(run) == _epoch_metrics(reference_run)


# -- the loader's fast-forward, on its own -----------------------------------------------------


@pytest.mark.parametrize("named", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_loader_started_mid_epoch_yields_the_tail_of_the_full_epoch(
    named: bool, start: int
) -> None:
    images, labels = torch.randn(20, 1, 6, 6), torch.arange(20)
    kwargs: dict[str, Any] = {"batch_size": 4, "shuffle": True, "augment": random_shift_flip}
    loader = (
        TensorBatchLoader(inputs=images, target=labels, seed=7, **kwargs)
        if named
        else TensorBatchLoader(images, labels, seed=7, **kwargs)
    )
    loader.set_epoch(2)
    full = list(loader)
    loader.set_start_step(start)
    tail = list(loader)
    assert len(tail) == len(full) - start
    for got, want in zip(tail, full[start:], strict=True):
        a_items: list[torch.Tensor] = list(got.values()) if isinstance(got, dict) else list(got)
        b_items: list[torch.Tensor] = list(want.values()) if isinstance(want, dict) else list(want)
        assert all(torch.equal(a, b) for a, b in zip(a_items, b_items, strict=True))
    loader.set_epoch(3)  # a new epoch starts from its first batch again
    assert len(list(loader)) == len(full)
    with pytest.raises(ValueError, match="start step"):
        loader.set_start_step(len(full) + 1)
