"""The one path from a config's shared sections to a running :class:`~kdistill.trainer.Trainer`.

Every entry point — ``kdistill run`` (:mod:`kdistill.experiment`), a scheme file
(:mod:`kdistill.schemes.runner`) and ``kdistill lm`` (:mod:`kdistill.lm.train`) — builds only
what is its own (the distiller or scheme, the data loaders, the summary) and hands it to
these two functions:

1. :func:`start_run` — threads, the ``torchrun`` process group, seeds and determinism, and
   the device, in that order (the same for every entry point, so a run's random numbers
   do not depend on which entry point started it);
2. :func:`build_trainer` — a :class:`~kdistill.trainer.Trainer` from ``optim`` and *every*
   ``train.*`` key (AMP, TensorBoard, mid-epoch checkpoints, non-finite guards, progress,
   ...). A key added to :class:`~kdistill.config.TrainConfig` is wired here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill import distributed
from kdistill.callbacks import Callback
from kdistill.config import OptimConfig, TrainConfig
from kdistill.trainer import TrainableModel, Trainer, resolve_device, seed_everything

__all__ = ["RunContext", "build_trainer", "start_run"]


@dataclass(frozen=True)
class RunContext:
    """Where a run executes: its device and, under ``torchrun``, its rank among ``world_size``."""

    device: torch.device
    rank: int = 0
    world_size: int = 1


def start_run(seed: int, train: TrainConfig) -> RunContext:
    """Set up the process for a run: threads, torchrun, seeds, determinism, device."""
    if train.threads:
        torch.set_num_threads(train.threads)
    rank, world_size = distributed.init_from_env()  # (0, 1) unless started by torchrun
    seed_everything(seed, train.deterministic)
    device = distributed.local_device(resolve_device(train.device))
    return RunContext(device, rank, world_size)


def build_trainer(
    model: TrainableModel,
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    *,
    optim: OptimConfig,
    train: TrainConfig,
    output_dir: str | Path,
    config: Mapping[str, Any],
    device: torch.device,
    evaluate_fn: Callable[..., Mapping[str, float]] | None = None,
    callbacks: Iterable[Callback] = (),
    epochs: int | None = None,
    progress: bool | None = None,
) -> Trainer:
    """A Trainer for ``model`` with every run-level setting of ``train`` and ``optim``.

    ``epochs`` / ``progress`` override ``train.epochs`` / ``train.progress`` (a scheme's
    teacher pre-training, an API caller's quiet run).
    """
    return Trainer(
        model,
        train_loader,
        eval_loader,
        optim,
        train.epochs if epochs is None else epochs,
        output_dir,
        device=device,
        progress=train.progress if progress is None else progress,
        config=config,
        checkpoint_every=train.checkpoint_every,
        skip_nonfinite=train.skip_nonfinite,
        amp=train.amp,
        tensorboard=train.tensorboard,
        evaluate_fn=evaluate_fn,
        callbacks=callbacks,
        accumulate_steps=train.accumulate_steps,
        eval_every=train.eval_every,
    )
