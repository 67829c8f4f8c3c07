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

import contextlib
import csv
import io
import itertools
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill import distributed
from kdistill.callbacks import Callback, CallbackList
from kdistill.checkpoint import atomic_write_text, save_weights
from kdistill.checkpointer import (
    RESUMABLE_DIFFERENCES,
    STEP_LOG,
    Checkpointer,
    PartialEpoch,
    ResumeError,
    ResumeWarning,
    TrainState,
)
from kdistill.config import ConfigError, OptimConfig
from kdistill.distiller import IGNORE_INDEX, LOGITS, Distiller, Inputs, untie_shared_tensors

__all__ = [
    "AMP_DTYPES",
    "IGNORE_INDEX",
    "RESUMABLE_DIFFERENCES",
    "STEP_LOG",
    "TEACHER_PREFIX",
    "FitResult",
    "ResumeError",
    "ResumeWarning",
    "TrainableModel",
    "Trainer",
    "batch_extras",
    "best_of",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "predict_logits",
    "resolve_device",
    "seed_everything",
    "unpack_batch",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""``Trainer(amp=...)``: the autocast dtype of the forward pass (``None``: float32)."""


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
    fused = bool(cfg.fused) and _fusable(params)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _fusable(params: Sequence[nn.Parameter]) -> bool:
    """torch's fused Adam(W) takes floating-point parameters on CPU or CUDA; ``optim.fused:
    true`` with others is an error naming the key (never a silent fallback)."""
    bad = [p for p in params if not p.is_floating_point() or p.device.type not in ("cpu", "cuda")]
    if bad:
        raise ConfigError(
            f"optim.fused: torch's fused Adam(W) needs floating-point parameters on CPU or "
            f"CUDA, not {bad[0].dtype} on {bad[0].device}; set optim.fused: false"
        )
    return True


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


_CORE_KEYS = ("inputs", "target", "index")


def batch_extras(batch: Any, device: torch.device | str) -> dict[str, Any]:
    """The entries of a dict batch besides ``inputs``, ``target``, ``index`` and
    ``teacher.*`` (e.g. ``teacher_inputs`` and a token ``alignment``), tensors (and mappings
    of tensors) on ``device``; empty for tuple batches."""
    if not isinstance(batch, Mapping):
        return {}
    return {
        key: _to_device(value, device) if isinstance(value, (Tensor, Mapping)) else value
        for key, value in batch.items()
        if key not in _CORE_KEYS and not key.startswith(TEACHER_PREFIX)
    }


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


@runtime_checkable
class TrainableModel(Protocol):
    """What the :class:`Trainer` needs from the model it trains.

    :class:`~kdistill.distiller.Distiller` and :class:`~kdistill.schemes.base.Scheme` provide
    it. ``forward(inputs, target, teacher_outputs=..., index=...)`` returns ``loss`` (with
    gradients), ``logits`` (detached, for the running train accuracy; ``None`` or absent
    when the model never forms them, e.g. a fused LM head — then no train accuracy), any detached
    ``"<part>_loss"`` scalars and optionally ``metrics`` (``{name: scalar}``, diagnostics
    logged as ``train_<name>`` whatever their name). ``student`` is the module evaluated every
    epoch and saved. A model may also define ``callbacks() -> list[Callback]`` (attached by
    the Trainer) and ``ddp_unsupported`` (a reason string: then it refuses to run under
    torchrun).
    """

    student: nn.Module

    def trainable_parameters(self) -> Iterable[nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, Tensor]: ...

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None: ...

    def set_progress(self, epoch: float) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


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


def ddp_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot train under DDP (a scheme's or a loss term's reason), or ``None``."""
    reason = getattr(model, "ddp_unsupported", None)
    if reason:
        return f"{type(model).__name__}: {reason}"
    for term in getattr(model, "terms", ()):
        loss = getattr(term, "loss", None)
        reason = getattr(loss, "ddp_unsupported", None)
        if reason:
            return f"loss term {term.name!r} ({type(loss).__name__}): {reason}"
    return None


class _EpochSums:
    """Running sums of one epoch: losses and metrics weighted by the counted targets."""

    def __init__(self, partial: PartialEpoch) -> None:
        self.sums, self.correct = partial.sums, partial.correct
        self.seen, self.skipped, self.scored = partial.seen, partial.skipped, partial.scored
        self.has_accuracy = False  # set once a batch's logits gave a train accuracy

    def add(
        self, out: Mapping[str, Any], n: int, correct: Tensor | None, scored: Tensor | int = 0
    ) -> None:
        """``n`` counted targets weigh the losses; ``correct`` of ``scored`` class labels
        (unlabelled samples, ``-1``, count for the losses but not the accuracy)."""
        self.seen += n
        self.scored += scored
        for key, value in out.items():
            if key.endswith("_loss"):
                self.sums[key] = self.sums.get(key, 0.0) + value * n
        for key, value in (out.get("metrics") or {}).items():
            self.sums[key] = self.sums.get(key, 0.0) + torch.as_tensor(value).detach().float() * n
        self.sums["loss"] = self.sums.get("loss", 0.0) + out["loss"].detach() * n
        if correct is not None:
            self.correct += correct
            self.has_accuracy = True

    def snapshot(self, epoch: int, step: int, elapsed_s: float) -> PartialEpoch:
        return PartialEpoch(
            epoch,
            step,
            self.sums,
            self.correct,
            self.seen,
            self.skipped,
            elapsed_s,
            int(self.scored),
        )


class Trainer:
    """Trains a distiller's (or scheme's) student, evaluates it every epoch, checkpoints.

    Args:
        distiller: the objective (a :class:`TrainableModel`); its ``trainable_parameters()``
            are optimised.
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
            when ``torch.utils.tensorboard`` can be imported (skipped with a note otherwise).
        evaluate_fn: ``fn(student, eval_loader, device) -> {"accuracy", "loss", ...}``, each
            metric logged as ``test_<name>``; default :func:`evaluate` (classification).
            :func:`kdistill.lm.batches.evaluate_lm` scores language models per token.
        callbacks: :class:`~kdistill.callbacks.Callback` s, after the model's own
            (``distiller.callbacks()`` when it has one).
        accumulate_steps: micro-batches per optimizer step (gradient accumulation). Each
            micro-batch's loss is weighted by its share of the window's counted targets, so
            a step equals one step on the concatenated batch (for per-target mean losses);
            ``steps``, the LR schedule and ``checkpoint_every`` count optimizer steps.
        eval_every: evaluate every N epochs and after the last (:meth:`evaluates`); the rows
            of the other epochs carry no ``test_*`` (nor callbacks' ``val_*``) metrics. Small
            training sets make evaluation cost more than the epoch itself.

    Targets may be class ids ``(B,)`` for logits ``(B, C)`` or token ids ``(B, T)`` for logits
    ``(B, T, V)`` (already aligned with them); ``train_accuracy`` and the weights of the epoch
    means count the targets that are not :data:`IGNORE_INDEX`.
    """

    def __init__(
        self,
        distiller: TrainableModel,
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
        callbacks: Iterable[Callback] = (),
        accumulate_steps: int = 1,
        eval_every: int = 1,
    ) -> None:
        if accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.accumulate_steps = accumulate_steps
        self.eval_every = eval_every
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
        if skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite must be >= 0, got {skip_nonfinite}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
        self.distiller = distiller.to(device)  # type: ignore[attr-defined]
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.optim_cfg = optim
        self.epochs = epochs
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.progress = progress
        self.config = dict(config or {})
        self.checkpoint_every = checkpoint_every
        self.skip_nonfinite = skip_nonfinite
        self.amp = amp
        self.tensorboard = tensorboard
        self.evaluate_fn = evaluate_fn if evaluate_fn is not None else evaluate
        self._sharded = distributed.is_sharded(distiller.student)
        if self._sharded:
            _check_shardable(distiller, amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, epochs, self.steps_per_epoch)
        self.checkpointer = Checkpointer(
            distiller,  # type: ignore[arg-type]
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.output_dir,
            config=self.config,
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            keep_last=keep_last,
            sharded=self._sharded,
            device=self.device,
            verbose=progress and distributed.is_main(),
        )
        own = distiller.callbacks() if hasattr(distiller, "callbacks") else []
        self.callbacks = CallbackList([*own, *callbacks])
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # the epoch in progress, from 0
        self.global_step = 0  # optimizer steps (batches) done, over the whole run
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._consecutive_skips = 0
        self._partial: PartialEpoch | None = None
        self._logged: dict[str, list[float]] = {}
        self._forward: nn.Module = self.distiller  # type: ignore[assignment]
        if distributed.is_distributed():
            self.progress = progress and distributed.is_main()
        # progress bars only on a terminal: a redirected log gets the epoch lines, not frames
        self._bars = self.progress and sys.stderr.isatty()
        if distributed.is_distributed() and not self._sharded:  # FSDP syncs gradients itself
            reason = ddp_unsupported(distiller)
            if reason:
                raise ValueError(
                    f"cannot train under torchrun (DDP) — {reason}; run it in one process"
                )
            module = _TrainableParts(distiller) if isinstance(distiller, Distiller) else distiller
            self._forward = nn.parallel.DistributedDataParallel(
                module,  # type: ignore[arg-type]
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    @property
    def model(self) -> TrainableModel:
        """The distiller or scheme being trained."""
        return self.distiller  # type: ignore[return-value]

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpointer.directory

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the loader's batches in windows of ``accumulate_steps``
        (the last window of an epoch may be shorter)."""
        return -(-len(self.train_loader) // self.accumulate_steps)  # type: ignore[arg-type]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def log_metric(self, name: str, value: float | Tensor) -> None:
        """Record a diagnostic for this epoch; the row holds the mean as ``train_<name>``."""
        self._logged.setdefault(name, []).append(float(value))

    # -- the loop ----------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume() if resume else None
        if start is None:
            if not resume and self.checkpointer.has_checkpoint():
                warnings.warn(
                    f"{self.checkpoint_dir} holds checkpoints of an earlier run; this run starts "
                    "from scratch (resume=False) and replaces them as it saves its own",
                    ResumeWarning,
                    stacklevel=2,
                )
            start = 0
            self.checkpointer.step_log.start()
        self.callbacks.fire("on_fit_start", self)
        writer = self._tensorboard_writer() if distributed.is_main() else None
        try:
            self._fit_epochs(start, writer)
        finally:
            if writer is not None:
                writer.close()
        student_path = self.output_dir / "student.safetensors"
        student_state = self.checkpointer.student_state_dict()  # every rank gathers if sharded
        if distributed.is_main():
            save_weights(student_path, untie_shared_tensors(student_state))
        distributed.barrier()  # no rank returns before the weights are written
        result = FitResult(self.history, self.output_dir, student_path)
        self.callbacks.fire("on_fit_end", self, result)
        return result

    def _fit_epochs(self, start: int, writer: Any) -> None:
        for epoch in range(start, self.epochs):
            began = time.perf_counter()
            if self._partial is not None and self._partial.epoch == epoch:
                began -= self._partial.elapsed_s
            self.epoch = epoch
            self.callbacks.fire("on_epoch_start", self, epoch)
            train_metrics = self.train_epoch(epoch)
            eval_metrics: Mapping[str, float] = {}
            if self.evaluates(epoch):
                self.callbacks.fire("on_evaluate_start", self)
                eval_metrics = self.evaluate_fn(
                    self.distiller.student, self.eval_loader, self.device
                )
                self.callbacks.fire("on_evaluate_end", self, eval_metrics)
            row = {
                "epoch": epoch + 1,
                **train_metrics,
                **{f"test_{k}": v for k, v in eval_metrics.items()},
                "epoch_time_s": time.perf_counter() - began,
            }
            self.callbacks.fire("on_epoch_end", self, epoch, row)
            self.history.append(row)
            self._save(epoch + 1, 0, None)
            if distributed.is_main():
                self._write_metrics()
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and type(value) in (int, float):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if distributed.is_main():  # one line per epoch, with or without progress bars
                _log(_format_row(row))

    def evaluates(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` ends with an evaluation: every ``eval_every`` epochs and
        always the last (so ``final`` holds the trained student's figures)."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns mean losses, accuracy and the last LR.

        Each optimizer step takes ``accumulate_steps`` micro-batches. After a mid-epoch
        resume, continues the epoch where its checkpoint left it.
        """
        steps, n_micro = self.steps_per_epoch, self.accumulate_steps
        partial, self._partial = self._partial, None
        if partial is None or partial.epoch != epoch:
            zero = torch.zeros((), dtype=torch.long, device=self.device)
            partial = PartialEpoch(epoch, 0, {}, zero, 0, 0, 0.0)
        began = time.perf_counter() - partial.elapsed_s
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        batches: Iterable[Any] = self.train_loader
        if partial.step:
            done = partial.step * n_micro  # micro-batches the checkpoint had trained on
            if hasattr(self.train_loader, "set_start_step"):
                self.train_loader.set_start_step(done)
            else:  # draw and drop them
                batches = itertools.islice(self.train_loader, done, None)
        self.distiller.train()
        self._logged = {}
        sums = _EpochSums(partial)
        bar = tqdm(
            _windows(batches, n_micro),
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self._bars,
            leave=False,
            dynamic_ncols=True,
            initial=partial.step,
            total=steps,
        )
        for step, window in enumerate(bar, start=partial.step):
            global_step = epoch * steps + step  # 0-based, like ``step``
            self.global_step = global_step
            self.distiller.set_progress(epoch + step / steps)
            micro = [self._unpack(batch) for batch in window]
            outs, loss, applied = self._step(micro, epoch, step)
            self.checkpointer.step_log.record(epoch, step, global_step, loss, applied)
            if applied:
                self.callbacks.fire("on_optimizer_step", self, global_step)
                for (x, y, *_), out in zip(micro, outs, strict=True):
                    counted = None if y is None else y != IGNORE_INDEX  # (B,) or (B, T)
                    n = _batch_size(x) if counted is None else int(counted.sum())
                    correct, scored = None, 0
                    logits = out.get("logits")
                    if counted is not None and _classes_last(logits, y):
                        labelled = counted & (y >= 0)  # not -1: an unlabelled sample
                        correct = ((logits.argmax(-1) == y) & labelled).sum()
                        scored = labelled.sum()  # a tensor: no device sync per step
                    sums.add(out, n, correct, scored)
            else:
                sums.skipped += 1
            self.global_step = global_step + 1
            self.callbacks.fire("on_batch_end", self, global_step, outs[-1])
            if self._bars and step % 20 == 0 and sums.seen:
                bar.set_postfix(
                    loss=f"{sums.sums['loss'].item() / sums.seen:.4f}",
                    acc=f"{sums.correct.item() / max(int(sums.scored), 1):.3f}",
                )
            every = self.checkpoint_every
            if every is not None and (global_step + 1) % every == 0 and step + 1 < steps:
                elapsed = time.perf_counter() - began
                self._save(epoch, step + 1, sums.snapshot(epoch, step + 1, elapsed))
        return self._epoch_metrics(sums)

    def _unpack(self, batch: Any) -> tuple[Any, Tensor | None, Any, Tensor | None, dict]:
        x, y, cached, index = unpack_batch(batch, self.device)
        return x, y, cached, index, batch_extras(batch, self.device)  # e.g. an alignment

    def _forward_micro(self, micro: tuple[Any, ...]) -> Mapping[str, Any]:
        x, y, cached, index, extras = micro
        with torch.autocast(self.device.type, AMP_DTYPES[self.amp], self.amp != "none"):
            more = {"extras": extras} if extras else {}
            return self._forward(x, y, teacher_outputs=cached, index=index, **more)

    def _epoch_metrics(self, sums: _EpochSums) -> dict[str, float]:
        totals, correct, seen = sums.sums, sums.correct, sums.seen
        scored = torch.as_tensor(sums.scored, device=correct.device)
        if distributed.is_distributed():  # the global means: equal shares on every rank
            totals = {k: distributed.all_sum(totals[k]) for k in sorted(totals)}
            correct = distributed.all_sum(correct)
            scored = distributed.all_sum(scored)
            seen *= distributed.world_size()
        metrics = {f"train_{k}": (v / max(seen, 1)).item() for k, v in totals.items()}
        metrics.setdefault("train_loss", math.nan)  # every batch of the epoch was skipped
        counted = sums.has_accuracy or not sums.seen  # a model without logits: no accuracy
        metrics["train_accuracy"] = correct.item() / max(int(scored), 1) if counted else math.nan
        for name, values in self._logged.items():
            metrics[f"train_{name}"] = sum(values) / len(values)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["skipped_steps"] = sums.skipped
        return metrics

    def _step(
        self, micro: list[tuple[Any, ...]], epoch: int, step: int
    ) -> tuple[list[Mapping[str, Any]], Tensor, bool]:
        """Forward and backward every micro-batch, then one optimizer step.

        Each micro-batch's loss is weighted by its share of the counted targets of the
        window (all ranks together), so the accumulated gradient is the gradient of the
        mean over the whole window — what one batch of all of it gives. Returns the outputs,
        the window's loss and ``False`` when the window was skipped as non-finite.
        """
        where = (
            f"epoch {epoch + 1}, step {step} (global step {epoch * self.steps_per_epoch + step})"
        )
        weights = _micro_weights([y if y is not None else x for x, y, *_ in micro])
        self.optimizer.zero_grad(set_to_none=True)
        outs: list[Mapping[str, Any]] = []
        total = torch.zeros((), device=self.device)
        problem = None
        for i, (part, weight) in enumerate(zip(micro, weights, strict=True)):
            out = self._forward_micro(part)
            outs.append(out)
            loss = out["loss"]
            total = total + loss.detach().float() * weight
            if not distributed.all_true(bool(torch.isfinite(loss)), loss.device):
                parts = {k: v.item() for k, v in out.items() if k.endswith("_loss")}
                bad = [k for k, v in parts.items() if not math.isfinite(v)]
                problem = f"non-finite loss at {where}: terms {bad} (all parts: {parts})"
                break
            if not loss.requires_grad:
                raise RuntimeError(
                    "the loss has no gradient: no term depends on a trainable parameter, or "
                    "training was started under torch.no_grad()/inference_mode()"
                )
            if weight != 1.0:
                loss = loss * weight
            last = i == len(micro) - 1
            sync = last or not isinstance(self._forward, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self._forward.no_sync():
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if problem is None:
            problem, skipped_by_scaler = self._optimizer_step(outs, where)
            if skipped_by_scaler:
                return outs, total, self._skip()
        if problem is None:
            self._consecutive_skips = 0
            self.scheduler.step()
            return outs, total, True
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
        return outs, total, self._skip()

    def _optimizer_step(self, outs: list[Mapping[str, Any]], where: str) -> tuple[str | None, bool]:
        """Clip, check and apply the accumulated gradients: ``(problem, skipped by the scaler)``."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        norm = self._grad_norm()  # of the all-reduced gradients: the same on every rank
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # halves the scale after non-finite gradients
            if not finite and scale > 1.0:  # a float16 overflow: the scaler's business
                return None, True
        elif finite:
            self.optimizer.step()
        if finite:
            return None, False
        parts = {k: round(v.item(), 6) for k, v in outs[-1].items() if k.endswith("_loss")}
        return (
            f"non-finite gradient norm ({norm.item()}) at {where}: the loss terms are "
            f"finite ({parts}) but the gradients of {self._nonfinite_grads()} are not"
        ), False

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

    def _save(self, epoch: int, step: int, partial: PartialEpoch | None) -> None:
        """Checkpoint after ``epoch`` whole epochs and ``step`` steps of the next one."""
        state = TrainState(epoch, step, self.history, self._consecutive_skips, partial)
        self.checkpointer.steps_per_epoch = self.steps_per_epoch  # the loader may have changed
        self.callbacks.fire("on_save_checkpoint", self, state.extra)
        self.checkpointer.save(state)
        self.callbacks.fire("on_checkpoint_saved", self, epoch, step)

    def _resume(self) -> int | None:
        """Restore the newest complete checkpoint; the epoch to continue in, or ``None``."""
        self.checkpointer.steps_per_epoch = self.steps_per_epoch  # the loader may have changed
        restored = self.checkpointer.resume(hasattr(self.train_loader, "set_epoch"))
        if restored is None:
            if self.progress:
                tqdm.write(f"no checkpoint in {self.checkpoint_dir}; starting from scratch")
            return None
        state, saved = restored
        self.history = state.history
        self._consecutive_skips = state.consecutive_skips
        self._partial = state.partial
        self.epoch = state.epoch
        self.global_step = state.epoch * self.steps_per_epoch + state.step
        self.callbacks.fire("on_load_checkpoint", self, saved)
        return state.epoch

    def _tensorboard_writer(self) -> Any:
        """A ``SummaryWriter`` on ``output_dir/tensorboard``, or ``None`` (off or not installed)."""
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            if self.progress:
                tqdm.write("train.tensorboard: the tensorboard package is not installed; skipped")
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


def _windows(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` batches (the last may be shorter)."""
    iterator = iter(batches)
    while window := list(itertools.islice(iterator, size)):
        yield window


def _micro_weights(targets: Sequence[Tensor]) -> list[float]:
    """Each micro-batch's share of the window's counted targets (``!= IGNORE_INDEX``; rows of
    an unlabelled batch), summed over all ranks; ``[1.0]`` for a single batch."""
    if len(targets) == 1:
        return [1.0]
    counts = torch.tensor(
        [
            float((t != IGNORE_INDEX).sum()) if t.dtype in _INT_DTYPES else float(t.shape[0])
            for t in targets
        ],
        dtype=torch.float64,
    )
    counts = distributed.all_sum(counts)
    return (counts / counts.sum().clamp_min(1.0)).tolist()


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_shardable(model: Any, amp: str) -> None:
    if amp == "fp16":
        raise ValueError(
            'amp="fp16" (a GradScaler) is not supported with an FSDP-sharded student; '
            'use amp="bf16" or "none"'
        )
    terms = getattr(model, "terms", None)
    if terms is not None and any(p.requires_grad for p in terms.parameters()):
        raise ValueError(
            "an FSDP-sharded student cannot be trained with loss-term adapters (they "
            "would need sharding too); use DDP or terms without trainable parameters"
        )


def _log(line: str) -> None:
    """A log line on stdout, flushed (above any progress bar, which lives on stderr)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _classes_last(logits: Tensor | None, target: Tensor) -> bool:
    """Whether ``logits (..., C)`` score the classes of ``target (...)`` (ids), so that
    ``train_accuracy`` means something; other outputs (boxes, no logits) log NaN."""
    return (
        logits is not None and logits.shape[:-1] == target.shape and not target.is_floating_point()
    )


def best_of(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """The largest ``key`` over the evaluated epochs of ``history`` (``train.eval_every``
    leaves it out of the others)."""
    return max(float(row[key]) for row in history if key in row)


def _format_row(row: Mapping[str, Any]) -> str:
    skipped = row.get("skipped_steps", 0)
    return (
        f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
        + (
            f"train_acc {row['train_accuracy']:.4f} "
            if math.isfinite(row.get("train_accuracy", math.nan))
            else ""
        )
        + (f"val_acc {row['val_accuracy']:.4f} " if "val_accuracy" in row else "")
        + (f"test_acc {row['test_accuracy']:.4f} " if "test_accuracy" in row else "")
        + (f"skipped {skipped} non-finite steps " if skipped else "")
        + f"({row['epoch_time_s']:.1f}s)"
    )
