"""Checkpoints and exact resume of a training run, kept apart from the training loop.

A :class:`Checkpointer` saves and restores *everything* that makes a resumed run end with the
same weights and per-step losses as an uninterrupted one (see ``docs/reliability.md``): the
trainable weights, optimizer, LR schedule, float16 loss scale, RNG states, the metrics
history, the consecutive-skip counter, the running sums of a partly trained epoch
(:class:`PartialEpoch`) and whatever callbacks add. The state it needs is explicit — the
objects given to its constructor and the :class:`TrainState` passed to :meth:`save` — so it
has no back-reference to the :class:`~kdistill.trainer.Trainer`.

:class:`StepLog` keeps ``steps.jsonl`` (one line per batch) consistent with the checkpoints:
it is flushed before every save and cut back to the checkpoint's step on resume.

Storage (atomic folders, checksums, ``COMPLETE`` markers, pruning) is :mod:`kdistill.checkpoint`.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.checkpoint import (
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from kdistill.distiller import untie_shared_tensors

__all__ = [
    "RESUMABLE_DIFFERENCES",
    "STEP_LOG",
    "Checkpointer",
    "PartialEpoch",
    "ResumeError",
    "ResumeWarning",
    "StepLog",
    "TrainState",
]

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
    "train.eval_every",  # when the student is scored, not what is trained
    "data.num_workers",
    "data.eval_batch_size",
    "distill.cache_dir",  # the on-disk teacher cache holds what the in-memory one would
    "distill.cache_rebuild",
    "distill.fused",  # kdistill lm: the fused head path equals the plain one to float rounding
    "distill.chunk_bytes",  # a chunk size changes only the float summation order
    "output_dir",
)

STEP_LOG = "steps.jsonl"
"""Per-step log in the output folder: one ``{"epoch", "step", "global_step", "loss"}`` line per
batch, ``epoch`` counted from 1 (as in ``metrics.jsonl``), ``step`` (within the epoch) and
``global_step`` from 0 (as in error messages); ``"skipped": true`` and ``"loss": null`` for a
skipped non-finite batch."""

_REQUIRED_STATE = ("epoch", "optimizer", "scheduler", "torch_rng", "python_rng")


class ResumeError(ValueError):
    """A checkpoint cannot be resumed exactly (incomplete state, or a changed config)."""


class ResumeWarning(UserWarning):
    """A resume goes ahead, but something differs from the checkpoint (named in the message)."""


@dataclass
class PartialEpoch:
    """Running sums of a partly trained epoch (restored when resuming mid-epoch)."""

    epoch: int
    step: int
    sums: dict[str, Tensor]
    correct: Tensor
    seen: int
    skipped: int
    elapsed_s: float
    scored: int = 0  # samples with a class label, the train accuracy's denominator


@dataclass
class TrainState:
    """Where the loop stands: what a checkpoint saves and a resume gives back."""

    epoch: int  # whole epochs done
    step: int = 0  # steps done of the next epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    consecutive_skips: int = 0
    partial: PartialEpoch | None = None  # running sums when ``step > 0``
    extra: dict[str, Any] = field(default_factory=dict)  # callbacks' entries


class StepLog:
    """``steps.jsonl``: per-batch losses, written in chunks and kept in step with checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: list[tuple[int, int, int, Tensor, bool]] = []

    def start(self) -> None:
        """A new run: an empty log (rank 0 writes)."""
        self.pending = []
        if distributed.is_main():
            atomic_write_text(self.path, "")

    def record(self, epoch: int, step: int, global_step: int, loss: Tensor, applied: bool) -> None:
        self.pending.append((epoch, step, global_step, loss, applied))

    def flush(self) -> None:
        """Append the pending step records and fsync (every rank calls it: losses are averaged)."""
        if not self.pending:
            return
        losses_t = torch.stack([record[3].float() for record in self.pending])
        # every rank flushes at the same steps; the logged loss is the mean over ranks
        losses = (distributed.all_sum(losses_t) / distributed.world_size()).tolist()
        if not distributed.is_main():
            self.pending = []
            return
        lines = []
        for (epoch, step, global_step, _, applied), loss in zip(self.pending, losses, strict=True):
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "global_step": global_step}
            row["loss"] = loss if applied else None
            if not applied:
                row["skipped"] = True
            lines.append(json.dumps(row) + "\n")
        with open(self.path, "a") as handle:
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
        self.pending = []

    def restore(self, global_step: int) -> None:
        """Cut the log back to the checkpoint's steps (the rest is redone)."""
        lines = self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []
        kept = lines[:global_step]
        if len(kept) < global_step or (kept and not kept[-1].endswith("\n")):
            warnings.warn(
                f"{self.path} holds {len(kept)} of the {global_step} steps before the checkpoint; "
                "the per-step log of the resumed run has a gap",
                ResumeWarning,
                stacklevel=4,
            )
        distributed.barrier()  # every rank has read the log before rank 0 cuts it
        if distributed.is_main():
            atomic_write_text(self.path, "".join(kept))
        self.pending = []


class Checkpointer:
    """Saves and restores a run's full training state in ``output_dir/checkpoints``.

    Args:
        model: the distiller or scheme (``trainable_state_dict`` / ``load_trainable_state_dict``;
            with a sharded student, ``student`` and ``terms``).
        optimizer, scheduler, scaler: the Trainer's (``scaler`` only for float16 AMP).
        output_dir: the run folder.
        config: the run's plain config, saved and compared on resume.
        epochs, steps_per_epoch: the schedule, which a resume must match.
        keep_last: complete checkpoints kept.
        sharded: the student is FSDP2-sharded (full tensors are gathered on every rank).
        device: where restored running sums go.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        output_dir: Path,
        *,
        config: Mapping[str, Any],
        epochs: int,
        steps_per_epoch: int,
        keep_last: int = 2,
        sharded: bool = False,
        device: torch.device | str = "cpu",
        verbose: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.output_dir = Path(output_dir)
        self.directory = self.output_dir / "checkpoints"
        self.config = dict(config)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.keep_last = keep_last
        self.sharded = sharded
        self.device = torch.device(device)
        self.verbose = verbose
        self.step_log = StepLog(self.output_dir / STEP_LOG)

    # -- weights ---------------------------------------------------------------------------

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's full state dict (gathered from every rank when it is sharded: all
        ranks must call this; only rank 0 gets the tensors)."""
        student = self.model.student  # type: ignore[attr-defined]
        if self.sharded:
            return distributed.full_state_dict(student)
        return student.state_dict()

    def _trainable_state_dict(self) -> dict[str, Tensor]:
        if not self.sharded:
            return self.model.trainable_state_dict()  # type: ignore[operator]
        state = {f"student.{k}": v for k, v in self.student_state_dict().items()}
        terms: nn.Module = self.model.terms  # type: ignore[assignment]
        state.update({f"terms.{k}": v for k, v in terms.state_dict().items()})
        return untie_shared_tensors(state)

    # -- save --------------------------------------------------------------------------------

    def save(self, state: TrainState) -> None:
        """Checkpoint after ``state.epoch`` whole epochs and ``state.step`` steps of the next."""
        self.step_log.flush()  # the log always reaches at least as far as the checkpoint
        weights = self._trainable_state_dict()  # all-gathered on every rank when sharded
        if self.sharded:
            optimizer_state = distributed.full_optimizer_state_dict(
                self.model.student,  # type: ignore[attr-defined]
                self.optimizer,
            )
        else:
            optimizer_state = self.optimizer.state_dict()
        saved: dict[str, Any] = {
            "epoch": state.epoch,
            "step": state.step,
            "global_step": state.epoch * self.steps_per_epoch + state.step,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "consecutive_skips": state.consecutive_skips,
            "history": json.dumps(state.history),
            "config": json.dumps(self.config),
            **state.extra,
        }
        if state.partial is not None:
            p = state.partial
            saved["partial"] = {
                "sums": {k: v.detach().cpu() for k, v in p.sums.items()},
                "correct": p.correct.detach().cpu(),
                "seen": p.seen,
                "skipped": p.skipped,
                "elapsed_s": p.elapsed_s,
                "scored": p.scored,
            }
        if torch.cuda.is_available():
            saved["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            saved["scaler"] = self.scaler.state_dict()
        if not distributed.is_main():
            return
        save_checkpoint(
            self.directory, state.epoch, weights, saved, keep_last=self.keep_last, step=state.step
        )

    # -- resume ------------------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        return latest_checkpoint(self.directory) is not None

    def resume(self, loader_is_seekable: bool = True) -> tuple[TrainState, dict[str, Any]] | None:
        """Restore the newest complete checkpoint: the loop's state and the raw saved state
        (for callbacks), or ``None`` when there is nothing to resume."""
        incomplete = [i.path.name for i in list_checkpoints(self.directory) if not i.complete]
        folder = latest_checkpoint(self.directory)
        if incomplete:
            warnings.warn(
                f"ignoring interrupted checkpoint saves in {self.directory}: {incomplete} "
                f"(no COMPLETE marker); resuming from {folder.name if folder else 'scratch'}",
                ResumeWarning,
                stacklevel=3,
            )
        if folder is None:
            return None
        weights, saved = self._load(folder)
        self._check_complete(folder, saved)
        _check_same_config(json.loads(saved.get("config", "{}")), self.config, folder)
        schedule = (saved.get("epochs"), saved.get("steps_per_epoch"))
        if schedule != (self.epochs, self.steps_per_epoch):
            raise ResumeError(
                f"cannot resume from {folder}: it was trained for {schedule[0]} epochs of "
                f"{schedule[1]} steps, this run has {self.epochs} epochs of "
                f"{self.steps_per_epoch} steps (the LR schedule depends on both)"
            )
        if not loader_is_seekable:
            warnings.warn(
                "train_loader has no set_epoch(): the resumed run cannot reproduce the batch "
                "order of the interrupted one; use kdistill.data.loader.TensorBatchLoader for an "
                "exact resume",
                ResumeWarning,
                stacklevel=3,
            )
        self._load_weights(folder, weights, saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(_as_tuple(saved["python_rng"]))
        if "cuda_rng" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        epoch, step = int(saved["epoch"]), int(saved.get("step", 0))
        partial = None
        if step:
            p = saved["partial"]
            partial = PartialEpoch(
                epoch,
                step,
                {k: v.to(self.device) for k, v in p["sums"].items()},
                p["correct"].to(self.device),
                int(p["seen"]),
                int(p["skipped"]),
                float(p["elapsed_s"]),
                int(p.get("scored", p["seen"])),  # older checkpoints scored every sample
            )
        self.step_log.restore(epoch * self.steps_per_epoch + step)
        if self.verbose:  # epoch-0001-step-000040: 1 whole epoch and 40 steps of epoch 2 done
            where = f"{epoch} whole epoch{'s' * (epoch != 1)} done" + (
                f" and {step} steps of epoch {epoch + 1}" if step else ""
            )
            print(f"resumed from {folder} ({where}; continuing in epoch {epoch + 1})")
        state = TrainState(
            epoch,
            step,
            json.loads(saved["history"]),
            int(saved.get("consecutive_skips", 0)),
            partial,
        )
        return state, saved

    def _load(self, folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        try:
            return load_checkpoint(folder)
        except CheckpointError as err:
            older = [
                i.path.name
                for i in list_checkpoints(self.directory)
                if i.complete and i.path != folder
            ]
            fallback = (
                f"delete {folder} to resume from the previous complete checkpoint {older[-1]}"
                if older
                else f"no older complete checkpoint is left in {self.directory}"
            )
            raise ResumeError(f"cannot resume: {err}; {fallback}") from err

    def _check_complete(self, folder: Path, saved: Mapping[str, Any]) -> None:
        missing = [k for k in _REQUIRED_STATE if k not in saved]
        if int(saved.get("step", 0)) and "partial" not in saved:
            missing.append("partial (running sums of the interrupted epoch)")
        if self.scaler is not None and "scaler" not in saved:
            missing.append("scaler (the float16 loss scale)")
        if missing:
            raise ResumeError(f"{folder}: checkpoint state lacks {missing}; cannot resume exactly")

    def _load_weights(
        self, folder: Path, weights: dict[str, Tensor], saved: Mapping[str, Any]
    ) -> None:
        try:
            if self.sharded:
                student = {k[8:]: v for k, v in weights.items() if k.startswith("student.")}
                distributed.load_full_state(
                    self.model.student,  # type: ignore[attr-defined]
                    student,
                    self.optimizer,
                    saved["optimizer"],
                )
                terms = {k[6:]: v for k, v in weights.items() if k.startswith("terms.")}
                self.model.terms.load_state_dict(terms)  # type: ignore[attr-defined]
            else:
                self.model.load_trainable_state_dict(weights)  # type: ignore[operator]
        except (RuntimeError, KeyError) as err:
            raise ResumeError(
                f"{folder / 'model.safetensors'} does not fit this run's student/adapters: {err}"
            ) from None
        if not self.sharded:
            self.optimizer.load_state_dict(saved["optimizer"])


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
