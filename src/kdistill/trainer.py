"""One readable training loop for any :class:`~kdistill.distiller.Distiller`.

Per epoch: train over the loader (optimizer step, LR schedule step, gradient clipping),
evaluate the student, append a row of metrics (CSV and JSONL), and write an atomic
checkpoint. ``fit(resume=True)`` continues from the newest checkpoint and — because batch
order and augmentation depend only on ``(seed, epoch)`` and the RNG state is saved — ends
with the same weights as an uninterrupted run on CPU.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from kdistill.config import OptimConfig
from kdistill.distiller import LOGITS, Distiller

# Config keys that may differ between a checkpoint and the resuming run without changing
# what is trained.
# what is trained (``train.epochs`` is not among them: it shapes the LR schedule).
RESUMABLE_DIFFERENCES = (
    "train.progress",
    "train.threads",
    "train.device",
    "data.num_workers",
    "data.eval_batch_size",
    "output_dir",
)


class ResumeError(ValueError):
    """A checkpoint cannot be resumed exactly (incomplete state, or a changed config)."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: cpu")
    return device


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


MIN_ONECYCLE_STEPS = 8
"""torch's OneCycleLR divides by zero below this; shorter (smoke) runs use a constant LR."""


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule. Milestones and warm-up are given in epochs."""
    total = epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= MIN_ONECYCLE_STEPS:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=0.25
        )
    warmup = cfg.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1.0, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, ...]], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``'s ``(x, y, ...)``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for batch in loader:
        x, y, _, _ = unpack_batch(batch, device)
        if y is None:
            raise ValueError("evaluation needs labelled batches")
        logits = model(x)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"accuracy": correct / count, "loss": loss_sum / count}


TEACHER_PREFIX = "teacher."
"""Dict batches carry cached teacher outputs as ``"teacher.<logits or layer name>"``."""


def unpack_batch(
    batch: Sequence[Tensor] | Mapping[str, Tensor], device: torch.device | str
) -> tuple[Tensor, Tensor | None, dict[str, Tensor] | None, Tensor | None]:
    """``(inputs, target, teacher_outputs, index)`` from a tuple or dict batch, on ``device``.

    Tuples are ``(x, y)`` or ``(x, y, teacher_logits)``; dicts hold ``inputs`` and optionally
    ``target``, ``index`` and ``teacher.<name>`` entries.
    """
    if isinstance(batch, Mapping):
        teacher = {
            k[len(TEACHER_PREFIX) :]: v.to(device, non_blocking=True)
            for k, v in batch.items()
            if k.startswith(TEACHER_PREFIX)
        }
        target, index = batch.get("target"), batch.get("index")
        return (
            batch["inputs"].to(device, non_blocking=True),
            None if target is None else target.to(device, non_blocking=True),
            teacher or None,
            None if index is None else index.to(device, non_blocking=True),
        )
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    teacher = {LOGITS: batch[2].to(device, non_blocking=True)} if len(batch) > 2 else None
    return x, y, teacher, None


@torch.inference_mode()
def predict_logits(
    model: nn.Module, inputs: Tensor, batch_size: int = 512, device: torch.device | str = "cpu"
) -> Tensor:
    """Logits ``(N, C)`` of a frozen model over ``inputs`` ``(N, ...)``, on CPU."""
    was_training = model.training
    model.eval()
    out = [
        model(inputs[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, inputs.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    output_dir: Path
    student_path: Path

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


class Trainer:
    """Trains ``distiller``'s student (and adapters) and evaluates it every epoch.

    Args:
        distiller: the objective; its ``trainable_parameters()`` are optimised.
        train_loader: iterable of ``(x, y)`` or ``(x, y, teacher_logits)`` batches; if it has
            ``set_epoch`` it is called before each epoch (fixing shuffling per epoch).
        eval_loader: iterable of ``(x, y)`` batches for test accuracy.
        optim: optimizer, schedule and gradient clipping settings.
        epochs: number of passes over ``train_loader``.
        output_dir: where checkpoints, metrics and the final student go.
        config: the run's plain config dict, saved with checkpoints and compared on resume.
    """

    def __init__(
        self,
        distiller: Distiller,
        train_loader: Iterable[tuple[Tensor, ...]],
        eval_loader: Iterable[tuple[Tensor, ...]],
        optim: OptimConfig,
        epochs: int,
        output_dir: str | Path,
        device: torch.device | str = "cpu",
        progress: bool = True,
        config: Mapping[str, Any] | None = None,
        keep_last: int = 2,
    ) -> None:
        self.distiller = distiller.to(device)
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.optim_cfg = optim
        self.epochs = epochs
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.progress = progress
        self.config = dict(config or {})
        self.keep_last = keep_last
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, epochs, len(train_loader))  # type: ignore[arg-type]
        self.history: list[dict[str, Any]] = []

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # -- the loop ----------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume() if resume else 0
        for epoch in range(start, self.epochs):
            began = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            eval_metrics = evaluate(self.distiller.student, self.eval_loader, self.device)
            row = {
                "epoch": epoch + 1,
                **train_metrics,
                "test_accuracy": eval_metrics["accuracy"],
                "test_loss": eval_metrics["loss"],
                "epoch_time_s": time.perf_counter() - began,
            }
            self.history.append(row)
            self._save(epoch + 1)
            self._write_metrics()
            if self.progress:
                tqdm.write(_format_row(row))
        student_path = save_weights(
            self.output_dir / "student.safetensors", self.distiller.student.state_dict()
        )
        return FitResult(self.history, self.output_dir, student_path)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns mean losses, accuracy and the last LR."""
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        self.distiller.train()
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        steps = len(self.train_loader)  # type: ignore[arg-type]
        for step, batch in enumerate(bar):
            x, y, cached, index = unpack_batch(batch, self.device)
            self.distiller.set_progress(epoch + step / steps)
            out = self.distiller(x, y, teacher_outputs=cached, index=index)
            self._step(out, epoch, step)
            n = x.shape[0]
            seen += n
            for key, value in out.items():
                if key.endswith("_loss"):
                    sums[key] = sums.get(key, 0.0) + value * n
            sums["loss"] = sums.get("loss", 0.0) + out["loss"].detach() * n
            if y is not None:
                correct += (out["logits"].argmax(-1) == y).sum()
            if self.progress and step % 20 == 0:
                bar.set_postfix(
                    loss=f"{sums['loss'].item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}"
                )
        metrics = {f"train_{k}": (v / seen).item() for k, v in sums.items()}
        metrics["train_accuracy"] = correct.item() / max(seen, 1)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _step(self, out: Mapping[str, Tensor], epoch: int, step: int) -> None:
        loss = out["loss"]
        if not torch.isfinite(loss):
            parts = {k: v.item() for k, v in out.items() if k.endswith("_loss")}
            bad = [k for k, v in parts.items() if not math.isfinite(v)]
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1}, step {step}: terms {bad} "
                f"(all parts: {parts}); lower the learning rate or check the inputs"
            )
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss has no gradient: no term depends on a trainable parameter, or "
                "training was started under torch.no_grad()/inference_mode()"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim_cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                list(self.distiller.trainable_parameters()), self.optim_cfg.grad_clip
            )
        self.optimizer.step()
        self.scheduler.step()

    # -- checkpoints and logs ----------------------------------------------------------

    def _save(self, epochs_done: int) -> None:
        state = {
            "epoch": epochs_done,
            "epochs": self.epochs,
            "steps_per_epoch": len(self.train_loader),  # type: ignore[arg-type]
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "history": json.dumps(self.history),
            "config": json.dumps(self.config),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_checkpoint(
            self.checkpoint_dir,
            epochs_done,
            self.distiller.trainable_state_dict(),
            state,
            keep_last=self.keep_last,
        )

    def _resume(self) -> int:
        folder = latest_checkpoint(self.checkpoint_dir)
        if folder is None:
            if self.progress:
                tqdm.write(f"no checkpoint in {self.checkpoint_dir}; starting from scratch")
            return 0
        weights, state = load_checkpoint(folder)
        missing = [
            k
            for k in ("epoch", "optimizer", "scheduler", "torch_rng", "python_rng")
            if k not in state
        ]
        if missing:
            raise ResumeError(f"{folder}: checkpoint state lacks {missing}; cannot resume exactly")
        _check_same_config(json.loads(state.get("config", "{}")), self.config, folder)
        schedule = (state.get("epochs"), state.get("steps_per_epoch"))
        if schedule != (self.epochs, len(self.train_loader)):  # type: ignore[arg-type]
            raise ResumeError(
                f"cannot resume from {folder}: it was trained for {schedule[0]} epochs of "
                f"{schedule[1]} steps, this run has {self.epochs} epochs of "
                f"{len(self.train_loader)} steps (the LR schedule depends on both)"  # type: ignore[arg-type]
            )
        self.distiller.load_trainable_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_tuple(state["python_rng"]))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = json.loads(state["history"])
        if self.progress:
            tqdm.write(f"resumed from {folder} (epoch {state['epoch']})")
        return int(state["epoch"])

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_text(self.output_dir / "metrics.jsonl", lines)
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.output_dir / "metrics.csv", buffer.getvalue())


def _check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], folder: Path) -> None:
    if not saved or not current:
        return
    before, after = _flatten(saved), _flatten(current)
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
        and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_DIFFERENCES)
    )
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise ResumeError(
            f"cannot resume from {folder}: the config changed in ways that change training "
            f"({details}). Resume with the original config or start a new output_dir."
        )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _format_row(row: Mapping[str, Any]) -> str:
    return (
        f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f} test_acc {row['test_accuracy']:.4f} "
        f"({row['epoch_time_s']:.1f}s)"
    )
