"""What every scheme shares: the duck-typed :class:`~kdistill.distiller.Distiller` interface.

The :class:`~kdistill.trainer.Trainer` never checks types; it calls

- ``trainable_parameters()`` once, to build the optimizer;
- ``train()`` before each epoch and ``set_progress(epoch_float)`` before each step;
- ``forward(x, y, teacher_outputs=..., index=...)`` returning a dict with ``loss`` (with
  gradients), ``logits`` (detached, ``(B, C)``, used for the running train accuracy), any
  number of detached ``"<part>_loss"`` scalars (logged as ``train_<part>_loss``) and
  optionally ``metrics`` (diagnostics, logged as ``train_<name>`` whatever the name);
- ``callbacks()`` once — the Trainer callbacks the scheme acts through (the run's total
  number of steps at the start, an EMA update after every optimizer step);
- ``student`` — the module evaluated every epoch and saved as ``student.safetensors``;
- ``trainable_state_dict()`` / ``load_trainable_state_dict()`` for checkpoints and resume.

:class:`Scheme` implements all but ``forward`` and ``student``. Its checkpoint state is the
whole ``state_dict()`` (trainable weights *and* the state a scheme keeps between steps, such
as an EMA teacher, a DINO center or a step counter — an exact resume needs them) minus the
prefixes listed in ``frozen_prefixes`` (fixed teachers, which come from their own files).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdistill.callbacks import Callback
from kdistill.config import OptimConfig
from kdistill.distiller import Distiller
from kdistill.trainer import FitResult, Trainer


class ConfigureSteps(Callback):
    """Tells a scheme the run's total number of optimizer steps when training starts."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme

    def on_fit_start(self, trainer: Any) -> None:
        self.scheme.configure(trainer.total_steps)


class Scheme(nn.Module):
    """Base class of the schemes: Distiller-compatible bookkeeping around ``forward``.

    Subclasses define ``forward`` and expose the evaluated model as ``student`` (a submodule
    or a property). ``frozen_prefixes`` names state-dict prefixes kept out of checkpoints.
    """

    frozen_prefixes: tuple[str, ...] = ()
    ddp_unsupported: str | None = None  # why the scheme cannot run under torchrun, if it cannot

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0  # epochs trained so far (fractional), set by the Trainer
        self.total_steps: int | None = None  # optimizer steps of the whole run, if known

    # -- schedule ------------------------------------------------------------------------

    def set_progress(self, epoch: float) -> None:
        """Called by the Trainer before every step with the (fractional) epoch."""
        self.progress = float(epoch)

    def configure(self, total_steps: int) -> None:
        """Tell the scheme how many optimizer steps the run has (momentum schedules).

        The Trainer calls it at the start of training (:class:`ConfigureSteps`).
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def callbacks(self) -> list[Callback]:
        """The Trainer callbacks this scheme acts through (attached by the Trainer)."""
        return [ConfigureSteps(self)]

    # -- parameters and checkpoints ------------------------------------------------------

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that takes gradients (``parameters()`` deduplicates shared ones)."""
        for param in self.parameters():
            if param.requires_grad:
                yield param

    def _kept(self, key: str) -> bool:
        return not any(key.startswith(prefix) for prefix in self.frozen_prefixes)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state a checkpoint must hold: everything but the frozen prefixes."""
        return {k: v for k, v in self.state_dict().items() if self._kept(k)}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; missing or unexpected keys raise ``RuntimeError``."""
        expected = set(self.trainable_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"{type(self).__name__} state does not fit: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        self.load_state_dict(dict(state), strict=False)


def train_scheme(
    scheme: Scheme | Distiller,
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    optim: OptimConfig,
    epochs: int,
    output_dir: str | Path,
    resume: bool = False,
    **trainer_kwargs: Any,
) -> FitResult:
    """Train a scheme with the standard :class:`~kdistill.trainer.Trainer` (Python API).

    The Trainer attaches the scheme's own callbacks (total steps, EMA updates);
    ``trainer_kwargs`` go to the Trainer (device, progress, config, amp, callbacks, ...).
    Scheme *files* run through :func:`kdistill.schemes.runner.run_scheme`, which builds the
    Trainer from the config like every other entry point.
    """
    trainer = Trainer(
        scheme,  # type: ignore[arg-type]
        train_loader,
        eval_loader,
        optim,
        epochs,
        output_dir,
        **trainer_kwargs,
    )
    return trainer.fit(resume=resume)
