"""One readable training loop for any :class:`~kdistill.distiller.Distiller`.

Per epoch: train over the loader (optimizer step, LR schedule step, gradient clipping),
evaluate the student, append a row of metrics (CSV and JSONL), and write an atomic
checkpoint — and, with ``checkpoint_every=N``, also one every ``N`` optimizer steps inside
the epoch. ``fit(resume=True)`` continues from the newest complete checkpoint and — because
batch order and augmentation depend only on ``(seed, epoch)``, the batches of a partly
done epoch are skipped exactly, and the RNG state, running sums and step log are saved —
ends with the same weights and the same per-step losses as an uninterrupted run on CPU,
even after a SIGKILL (see ``docs/reliability.md``).

Every optimizer step is guarded: a non-finite loss or gradient norm stops training before
the optimizer step with a :class:`FloatingPointError` naming the loss term (or parameters)
and the step, or, with ``skip_nonfinite=N``, skips the batch and counts it.

``amp="bf16"`` or ``"fp16"`` runs the distiller's forward under :func:`torch.autocast`;
float16 adds a :class:`torch.amp.GradScaler` whose skipped steps are counted as
``skipped_steps`` too. Per-epoch metrics go to ``metrics.csv`` and ``metrics.jsonl``, and to
TensorBoard (``output_dir/tensorboard``) when it is installed.

Under ``torchrun`` (a process group from :func:`kdistill.distributed.init_from_env`) the student
and loss-term adapters are trained through :class:`~torch.nn.parallel.DistributedDataParallel`
(the frozen teacher is not wrapped); logged losses and accuracy are averaged over all ranks and
only rank 0 writes files. Checkpoints hold the same keys as a single-process run's.
A student already sharded with FSDP2 (:func:`kdistill.distributed.shard_student`, before the
Trainer is built) is trained as it is, without DDP: the optimizer holds the sharded (DTensor)
parameters, and the checkpoints and ``student.safetensors`` hold full tensors gathered on every
rank (:func:`kdistill.distributed.full_state_dict`; the optimizer state likewise, keyed by
parameter name), which a resume loads back into the sharded student.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill import distributed
from kdistill.checkpoint import (
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from kdistill.config import OptimConfig
from kdistill.distiller import LOGITS, Distiller, Inputs, untie_shared_tensors

# Config keys that may differ between a checkpoint and the resuming run without changing
# what is trained (``train.epochs`` is not among them: it shapes the LR schedule). A resume
# with such a difference warns (:class:`ResumeWarning`) naming the keys; any other
# difference is a :class:`ResumeError`.
RESUMABLE_DIFFERENCES = (
    "train.progress",
    "train.threads",
    "train.device",
    "train.checkpoint_every",
    "train.skip_nonfinite",
    "train.tensorboard",
    "data.num_workers",
    "data.eval_batch_size",
    "distill.cache_dir",  # the on-disk teacher cache holds what the in-memory one would
    "distill.cache_rebuild",
    "output_dir",
)

STEP_LOG = "steps.jsonl"
"""Per-step log in the output folder: one ``{"epoch", "step", "global_step", "loss"}`` line per
batch, ``epoch`` counted from 1 (as in ``metrics.jsonl``), ``step`` (within the epoch) and
``global_step`` from 0 (as in error messages); ``"skipped": true`` and ``"loss": null`` for a
skipped non-finite batch."""

_REQUIRED_STATE = ("epoch", "optimizer", "scheduler", "torch_rng", "python_rng")

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""``Trainer(amp=...)``: the autocast dtype of the forward pass (``None``: float32)."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed exactly (incomplete state, or a changed config)."""


class ResumeWarning(UserWarning):
    """A resume goes ahead, but something differs from the checkpoint (named in the message)."""


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
    model: nn.Module,
    loader: Iterable[Sequence[Tensor] | Mapping[str, Tensor]],
    device: torch.device | str = "cpu",
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

IGNORE_INDEX = -100
"""Targets equal to this do not count in the training accuracy and its token count (padding
and prompt tokens of language-model batches, as in Hugging Face)."""


def _to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def _batch_size(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0]
    return inputs.shape[0]


def unpack_batch(
    batch: Sequence[Tensor] | Mapping[str, Any], device: torch.device | str
) -> tuple[Inputs, Tensor | None, dict[str, Tensor] | None, Tensor | None]:
    """``(inputs, target, teacher_outputs, index)`` from a tuple or dict batch, on ``device``.

    Tuples are ``(x, y)`` or ``(x, y, teacher_logits)``; dicts hold ``inputs`` (a tensor, or a
    mapping of keyword tensors such as a language model's ``input_ids`` and
    ``attention_mask``) and optionally ``target``, ``index`` and ``teacher.<name>`` entries;
    other keys are ignored.
    """
    if isinstance(batch, Mapping):
        teacher: dict[str, Tensor] | None = {
            k[len(TEACHER_PREFIX) :]: v.to(device, non_blocking=True)
            for k, v in batch.items()
            if k.startswith(TEACHER_PREFIX)
        }
        target, index = batch.get("target"), batch.get("index")
        return (
            _to_device(batch["inputs"], device),
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


@dataclass
class _Partial:
    """Running sums of a partly trained epoch (restored when resuming mid-epoch)."""

    epoch: int
    step: int
    sums: dict[str, Tensor]
    correct: Tensor
    seen: int
    skipped: int
    elapsed_s: float


class _TrainableParts(nn.Module):
    """Student and loss terms (adapters) as one module for DDP; ``forward`` is the distiller's.

    The distiller is held outside the module tree, so its frozen teacher is not part of what
    DDP wraps, broadcasts or synchronises.
    """

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.student = distiller.student
        self.terms = distiller.terms
        object.__setattr__(self, "distiller", distiller)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return self.distiller(*args, **kwargs)  # type: ignore[operator]


class Trainer:
    """Trains ``distiller``'s student (and adapters) and evaluates it every epoch.

    Args:
        distiller: the objective; its ``trainable_parameters()`` are optimised.
        train_loader: iterable of ``(x, y)`` or ``(x, y, teacher_logits)`` batches; if it has
            ``set_epoch`` it is called before each epoch (fixing shuffling per epoch), and if
            it has ``set_start_step`` that is used to resume inside an epoch (otherwise the
            done batches are drawn and dropped).
        eval_loader: iterable of ``(x, y)`` batches for test accuracy.
        optim: optimizer, schedule and gradient clipping settings.
        epochs: number of passes over ``train_loader``.
        output_dir: where checkpoints, metrics, the step log and the final student go.
        config: the run's plain config dict, saved with checkpoints and compared on resume.
        keep_last: how many complete checkpoints to keep.
        checkpoint_every: also checkpoint every this many optimizer steps (counted over the
            whole run) inside epochs; ``None`` checkpoints only at epoch ends.
        skip_nonfinite: ``0`` stops at the first non-finite loss or gradient norm; ``N > 0``
            skips such batches (no optimizer step, counted as ``skipped_steps``) and stops at
            the ``N + 1``-th in a row.
        amp: ``"bf16"`` or ``"fp16"`` runs the distiller's forward (student, live teacher,
            loss terms) under ``torch.autocast``; evaluation stays float32. ``"fp16"`` scales
            the loss with a ``GradScaler``: a step whose gradients overflow at a loss scale
            above 1 is skipped by the scaler (which halves the scale) and counted in
            ``skipped_steps`` without counting against ``skip_nonfinite``; non-finite
            gradients at a scale of 1 or less are non-finite in their own right and handled
            like any other (an error, or a skip under ``skip_nonfinite``).
        tensorboard: also write each epoch's numeric metrics to ``output_dir/tensorboard``
            when ``torch.utils.tensorboard`` can be imported (silently skipped otherwise).
        evaluate_fn: ``fn(student, eval_loader, device) -> {"accuracy", "loss", ...}``, each
            metric logged as ``test_<name>``; default :func:`evaluate` (classification).
            :func:`kdistill.lm.batches.evaluate_lm` scores language models per token.

    Targets may be class ids ``(B,)`` for logits ``(B, C)`` or token ids ``(B, T)`` for logits
    ``(B, T, V)`` (already aligned with them); ``train_accuracy`` and the weights of the epoch
    means count the targets that are not :data:`IGNORE_INDEX`.
    """

    def __init__(
        self,
        distiller: Distiller,
        train_loader: Iterable[Sequence[Tensor] | Mapping[str, Tensor]],
        eval_loader: Iterable[Sequence[Tensor] | Mapping[str, Tensor]],
        optim: OptimConfig,
        epochs: int,
        output_dir: str | Path,
        device: torch.device | str = "cpu",
        progress: bool = True,
        config: Mapping[str, Any] | None = None,
        keep_last: int = 2,
        checkpoint_every: int | None = None,
        skip_nonfinite: int = 0,
        amp: Literal["none", "bf16", "fp16"] = "none",
        tensorboard: bool = True,
        evaluate_fn: Callable[..., Mapping[str, float]] | None = None,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
        if skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite must be >= 0, got {skip_nonfinite}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
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
        self.checkpoint_every = checkpoint_every
        self.skip_nonfinite = skip_nonfinite
        self.amp = amp
        self.tensorboard = tensorboard
        self.evaluate_fn = evaluate_fn if evaluate_fn is not None else evaluate
        self._sharded = distributed.is_sharded(distiller.student)
        if self._sharded:
            if amp == "fp16":
                raise ValueError(
                    'amp="fp16" (a GradScaler) is not supported with an FSDP-sharded student; '
                    'use amp="bf16" or "none"'
                )
            if any(p.requires_grad for p in distiller.terms.parameters()):
                raise ValueError(
                    "an FSDP-sharded student cannot be trained with loss-term adapters (they "
                    "would need sharding too); use DDP or terms without trainable parameters"
                )
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, epochs, len(train_loader))  # type: ignore[arg-type]
        self.history: list[dict[str, Any]] = []
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._consecutive_skips = 0
        self._partial: _Partial | None = None
        self._pending_steps: list[tuple[int, int, int, Tensor, bool]] = []
        self._forward: nn.Module = self.distiller
        if distributed.is_distributed():
            self.progress = progress and distributed.is_main()
        if distributed.is_distributed() and not self._sharded:  # FSDP syncs gradients itself
            self._forward = nn.parallel.DistributedDataParallel(
                _TrainableParts(self.distiller),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)  # type: ignore[arg-type]

    # -- the loop ----------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume() if resume else None
        if start is None:
            if not resume and latest_checkpoint(self.checkpoint_dir) is not None:
                warnings.warn(
                    f"{self.checkpoint_dir} holds checkpoints of an earlier run; this run starts "
                    "from scratch (resume=False) and replaces them as it saves its own",
                    ResumeWarning,
                    stacklevel=2,
                )
            start = 0
            self._pending_steps = []
            if distributed.is_main():
                atomic_write_text(self.output_dir / STEP_LOG, "")
        writer = self._tensorboard_writer() if distributed.is_main() else None
        try:
            self._fit_epochs(start, writer)
        finally:
            if writer is not None:
                writer.close()
        student_path = self.output_dir / "student.safetensors"
        student_state = self._student_state_dict()  # every rank gathers a sharded student
        if distributed.is_main():
            save_weights(student_path, untie_shared_tensors(student_state))
        distributed.barrier()  # no rank returns before the weights are written
        return FitResult(self.history, self.output_dir, student_path)

    def _fit_epochs(self, start: int, writer: Any) -> None:
        for epoch in range(start, self.epochs):
            began = time.perf_counter()
            if self._partial is not None and self._partial.epoch == epoch:
                began -= self._partial.elapsed_s
            train_metrics = self.train_epoch(epoch)
            eval_metrics = self.evaluate_fn(self.distiller.student, self.eval_loader, self.device)
            row = {
                "epoch": epoch + 1,
                **train_metrics,
                **{f"test_{k}": v for k, v in eval_metrics.items()},
                "epoch_time_s": time.perf_counter() - began,
            }
            self.history.append(row)
            self._save(epoch + 1)
            if distributed.is_main():
                self._write_metrics()
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and type(value) in (int, float):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if self.progress:
                tqdm.write(_format_row(row))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns mean losses, accuracy and the last LR.

        After a mid-epoch resume, continues the epoch where its checkpoint left it.
        """
        steps = self.steps_per_epoch
        partial, self._partial = self._partial, None
        if partial is None or partial.epoch != epoch:
            partial = _Partial(
                epoch, 0, {}, torch.zeros((), dtype=torch.long, device=self.device), 0, 0, 0.0
            )
        began = time.perf_counter() - partial.elapsed_s
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        batches: Iterable[Any] = self.train_loader
        if partial.step:
            if hasattr(self.train_loader, "set_start_step"):
                self.train_loader.set_start_step(partial.step)
            else:  # draw and drop the batches the checkpoint had already trained on
                batches = itertools.islice(self.train_loader, partial.step, None)
        self.distiller.train()
        sums, correct, seen, skipped = partial.sums, partial.correct, partial.seen, partial.skipped
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
            initial=partial.step,
            total=steps,
        )
        for step, batch in enumerate(bar, start=partial.step):
            x, y, cached, index = unpack_batch(batch, self.device)
            self.distiller.set_progress(epoch + step / steps)
            with torch.autocast(self.device.type, AMP_DTYPES[self.amp], self.amp != "none"):
                out = self._forward(x, y, teacher_outputs=cached, index=index)
            applied = self._step(out, epoch, step)
            global_step = epoch * steps + step  # 0-based, like ``step``
            self._pending_steps.append((epoch, step, global_step, out["loss"].detach(), applied))
            if applied:
                counted = None if y is None else y != IGNORE_INDEX  # (B,) or (B, T)
                n = _batch_size(x) if counted is None else int(counted.sum())
                seen += n
                for key, value in out.items():
                    if key.endswith("_loss"):
                        sums[key] = sums.get(key, 0.0) + value * n
                sums["loss"] = sums.get("loss", 0.0) + out["loss"].detach() * n
                if counted is not None:
                    correct += ((out["logits"].argmax(-1) == y) & counted).sum()
            else:
                skipped += 1
            if self.progress and step % 20 == 0 and seen:
                bar.set_postfix(
                    loss=f"{sums['loss'].item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}"
                )
            every = self.checkpoint_every
            if every is not None and (global_step + 1) % every == 0 and step + 1 < steps:
                elapsed = time.perf_counter() - began
                done = _Partial(epoch, step + 1, sums, correct, seen, skipped, elapsed)
                self._save_checkpoint(epoch, step + 1, done)
        if distributed.is_distributed():  # the global means: equal shares on every rank
            sums = {k: distributed.all_sum(sums[k]) for k in sorted(sums)}
            correct = distributed.all_sum(correct)
            seen *= distributed.world_size()
        metrics = {f"train_{k}": (v / max(seen, 1)).item() for k, v in sums.items()}
        metrics.setdefault("train_loss", math.nan)  # every batch of the epoch was skipped
        metrics["train_accuracy"] = correct.item() / max(seen, 1)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["skipped_steps"] = skipped
        return metrics

    def _step(self, out: Mapping[str, Tensor], epoch: int, step: int) -> bool:
        """Backward and optimizer step; ``False`` when the batch was skipped as non-finite."""
        loss = out["loss"]
        where = (
            f"epoch {epoch + 1}, step {step} (global step {epoch * self.steps_per_epoch + step})"
        )
        problem = None
        if not distributed.all_true(bool(torch.isfinite(loss)), loss.device):
            parts = {k: v.item() for k, v in out.items() if k.endswith("_loss")}
            bad = [k for k, v in parts.items() if not math.isfinite(v)]
            problem = f"non-finite loss at {where}: terms {bad} (all parts: {parts})"
        else:
            if not loss.requires_grad:
                raise RuntimeError(
                    "the loss has no gradient: no term depends on a trainable parameter, or "
                    "training was started under torch.no_grad()/inference_mode()"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
            norm = self._grad_norm()  # of the all-reduced gradients: the same on every rank
            finite = bool(torch.isfinite(norm))
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                if finite:
                    self.scaler.step(self.optimizer)
                self.scaler.update()  # halves the scale after non-finite gradients
                if not finite and scale > 1.0:  # a float16 overflow: the scaler's business
                    return self._skip()
            elif finite:
                self.optimizer.step()
            if not finite:
                parts = {k: round(v.item(), 6) for k, v in out.items() if k.endswith("_loss")}
                problem = (
                    f"non-finite gradient norm ({norm.item()}) at {where}: the loss terms are "
                    f"finite ({parts}) but the gradients of {self._nonfinite_grads()} are not"
                )
        if problem is None:
            self._consecutive_skips = 0
            self.scheduler.step()
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self._consecutive_skips += 1
        if self.skip_nonfinite == 0:
            raise FloatingPointError(
                f"{problem}; stopped before the optimizer step. Lower the learning rate or "
                "check the inputs (train.skip_nonfinite: N skips up to N such batches in a row)"
            )
        if self._consecutive_skips > self.skip_nonfinite:
            raise FloatingPointError(
                f"{problem}; {self._consecutive_skips} non-finite batches in a row, more than "
                f"skip_nonfinite={self.skip_nonfinite}; stopped before the optimizer step"
            )
        return self._skip()

    def _skip(self) -> bool:
        """Drop the batch's gradients without an optimizer step; returns ``False``."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule stays aligned with the batches
        return False

    def _grad_norm(self) -> Tensor:
        """The global gradient norm (clipping to ``grad_clip`` when it is set).

        With a sharded student the gradients are DTensor shards: torch's norm reduces over the
        shards, and the result (a replicated DTensor) becomes a plain tensor, equal on every rank.
        """
        if self.optim_cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.optim_cfg.grad_clip)
            return distributed.full_tensor(norm)
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return distributed.full_tensor(torch.nn.utils.get_total_norm(grads))

    def _nonfinite_grads(self, limit: int = 5) -> list[str]:
        names = [
            name
            for name, p in self.distiller.named_parameters()
            if p.grad is not None and not torch.isfinite(distributed.full_tensor(p.grad)).all()
        ]
        return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])

    # -- checkpoints and logs ----------------------------------------------------------

    def _student_state_dict(self) -> dict[str, Tensor]:
        """The student's full state dict (gathered from every rank when it is sharded: all
        ranks must call this; only rank 0 gets the tensors)."""
        if self._sharded:
            return distributed.full_state_dict(self.distiller.student)
        return self.distiller.student.state_dict()

    def _trainable_state_dict(self) -> dict[str, Tensor]:
        """:meth:`Distiller.trainable_state_dict`, with a sharded student gathered in full."""
        if not self._sharded:
            return self.distiller.trainable_state_dict()
        state = {f"student.{k}": v for k, v in self._student_state_dict().items()}
        state.update({f"terms.{k}": v for k, v in self.distiller.terms.state_dict().items()})
        return untie_shared_tensors(state)

    def _save(self, epochs_done: int) -> None:
        self._save_checkpoint(epochs_done, 0, None)

    def _save_checkpoint(self, epoch: int, step: int, partial: _Partial | None) -> None:
        """Checkpoint after ``epoch`` whole epochs and ``step`` steps of the next one."""
        self._flush_step_log()  # the log always reaches at least as far as the checkpoint
        if self._sharded:  # all-gathered on every rank, so before rank 0 alone goes on
            weights = self._trainable_state_dict()
            optimizer_state = distributed.full_optimizer_state_dict(
                self.distiller.student, self.optimizer
            )
        else:
            weights, optimizer_state = {}, self.optimizer.state_dict()
        state: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "global_step": epoch * self.steps_per_epoch + step,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "consecutive_skips": self._consecutive_skips,
            "history": json.dumps(self.history),
            "config": json.dumps(self.config),
        }
        if partial is not None:
            state["partial"] = {
                "sums": {k: v.detach().cpu() for k, v in partial.sums.items()},
                "correct": partial.correct.detach().cpu(),
                "seen": partial.seen,
                "skipped": partial.skipped,
                "elapsed_s": partial.elapsed_s,
            }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if not distributed.is_main():
            return
        save_checkpoint(
            self.checkpoint_dir,
            epoch,
            weights if self._sharded else self.distiller.trainable_state_dict(),
            state,
            keep_last=self.keep_last,
            step=step,
        )

    def _flush_step_log(self) -> None:
        """Append the pending step records to ``steps.jsonl`` and fsync it."""
        if not self._pending_steps:
            return
        losses_t = torch.stack([record[3].float() for record in self._pending_steps])
        # every rank flushes at the same steps; the logged loss is the mean over ranks
        losses = (distributed.all_sum(losses_t) / distributed.world_size()).tolist()
        if not distributed.is_main():
            self._pending_steps = []
            return
        lines = []
        for (epoch, step, global_step, _, applied), loss in zip(
            self._pending_steps, losses, strict=True
        ):
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "global_step": global_step}
            row["loss"] = loss if applied else None
            if not applied:
                row["skipped"] = True
            lines.append(json.dumps(row) + "\n")
        with open(self.output_dir / STEP_LOG, "a") as handle:
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
        self._pending_steps = []

    def _resume(self) -> int | None:
        """Restore the newest complete checkpoint; the epoch to continue in, or ``None``."""
        incomplete = [i.path.name for i in list_checkpoints(self.checkpoint_dir) if not i.complete]
        folder = latest_checkpoint(self.checkpoint_dir)
        if incomplete:
            warnings.warn(
                f"ignoring interrupted checkpoint saves in {self.checkpoint_dir}: {incomplete} "
                f"(no COMPLETE marker); resuming from {folder.name if folder else 'scratch'}",
                ResumeWarning,
                stacklevel=3,
            )
        if folder is None:
            if self.progress:
                tqdm.write(f"no checkpoint in {self.checkpoint_dir}; starting from scratch")
            return None
        try:
            weights, state = load_checkpoint(folder)
        except CheckpointError as err:
            older = [
                i.path.name
                for i in list_checkpoints(self.checkpoint_dir)
                if i.complete and i.path != folder
            ]
            fallback = (
                f"delete {folder} to resume from the previous complete checkpoint {older[-1]}"
                if older
                else f"no older complete checkpoint is left in {self.checkpoint_dir}"
            )
            raise ResumeError(f"cannot resume: {err}; {fallback}") from err
        missing = [k for k in _REQUIRED_STATE if k not in state]
        step = int(state.get("step", 0))
        if step and "partial" not in state:
            missing.append("partial (running sums of the interrupted epoch)")
        if self.scaler is not None and "scaler" not in state:
            missing.append("scaler (the float16 loss scale)")
        if missing:
            raise ResumeError(f"{folder}: checkpoint state lacks {missing}; cannot resume exactly")
        _check_same_config(json.loads(state.get("config", "{}")), self.config, folder)
        schedule = (state.get("epochs"), state.get("steps_per_epoch"))
        if schedule != (self.epochs, self.steps_per_epoch):
            raise ResumeError(
                f"cannot resume from {folder}: it was trained for {schedule[0]} epochs of "
                f"{schedule[1]} steps, this run has {self.epochs} epochs of "
                f"{self.steps_per_epoch} steps (the LR schedule depends on both)"
            )
        if not hasattr(self.train_loader, "set_epoch"):
            warnings.warn(
                "train_loader has no set_epoch(): the resumed run cannot reproduce the batch "
                "order of the interrupted one; use kdistill.data.loader.TensorBatchLoader for an "
                "exact resume",
                ResumeWarning,
                stacklevel=3,
            )
        try:
            if self._sharded:
                student = {k[8:]: v for k, v in weights.items() if k.startswith("student.")}
                distributed.load_full_state(
                    self.distiller.student, student, self.optimizer, state["optimizer"]
                )
                terms = {k[6:]: v for k, v in weights.items() if k.startswith("terms.")}
                self.distiller.terms.load_state_dict(terms)
            else:
                self.distiller.load_trainable_state_dict(weights)
        except (RuntimeError, KeyError) as err:
            raise ResumeError(
                f"{folder / 'model.safetensors'} does not fit this run's student/adapters: {err}"
            ) from None
        if not self._sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_tuple(state["python_rng"]))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        epoch = int(state["epoch"])
        if step:
            saved = state["partial"]
            self._partial = _Partial(
                epoch,
                step,
                {k: v.to(self.device) for k, v in saved["sums"].items()},
                saved["correct"].to(self.device),
                int(saved["seen"]),
                int(saved["skipped"]),
                float(saved["elapsed_s"]),
            )
        self._restore_step_log(epoch * self.steps_per_epoch + step)
        if self.progress:
            where = f"epoch {epoch}" + (f", step {step}" if step else "")
            tqdm.write(f"resumed from {folder} ({where})")
        return epoch

    def _restore_step_log(self, global_step: int) -> None:
        """Cut ``steps.jsonl`` back to the checkpoint's steps (the rest is redone)."""
        path = self.output_dir / STEP_LOG
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        kept = lines[:global_step]
        if len(kept) < global_step or (kept and not kept[-1].endswith("\n")):
            warnings.warn(
                f"{path} holds {len(kept)} of the {global_step} steps before the checkpoint; "
                "the per-step log of the resumed run has a gap",
                ResumeWarning,
                stacklevel=4,
            )
        distributed.barrier()  # every rank has read the log before rank 0 cuts it
        if distributed.is_main():
            atomic_write_text(path, "".join(kept))
        self._pending_steps = []

    def _tensorboard_writer(self) -> Any:
        """A ``SummaryWriter`` on ``output_dir/tensorboard``, or ``None`` (off or not installed)."""
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

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
    """Raise :class:`ResumeError` for differences that change training; warn for the rest."""
    if not saved and not current:
        return
    if not saved or not current:
        which = "the checkpoint has no config" if not saved else "this run gives no config"
        warnings.warn(
            f"resuming from {folder}: {which}, so the configs cannot be compared",
            ResumeWarning,
            stacklevel=4,
        )
        return
    before, after = _flatten(saved), _flatten(current)
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    harmless = [
        k for k in differ if any(k == p or k.startswith(p + ".") for p in RESUMABLE_DIFFERENCES)
    ]
    changed = [k for k in differ if k not in harmless]
    if harmless and not changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in harmless)
        warnings.warn(
            f"resuming from {folder} with settings that differ but do not change training: "
            f"{details}",
            ResumeWarning,
            stacklevel=4,
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
    skipped = row.get("skipped_steps", 0)
    return (
        f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f} test_acc {row['test_accuracy']:.4f} "
        + (f"skipped {skipped} non-finite steps " if skipped else "")
        + f"({row['epoch_time_s']:.1f}s)"
    )
