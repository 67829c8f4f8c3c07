"""Trainer callbacks: named points in the loop where schemes and users act.

After Hugging Face's ``TrainerCallback`` and Lightning's ``Callback``: the
:class:`~kdistill.trainer.Trainer` calls every attached callback's hook at a fixed point of
the loop, so an EMA update, a logger or a schedule acts at the right moment without the loop
knowing about it. Hooks receive the trainer (read its ``model``, ``optimizer``, ``epoch``,
``global_step``, ``output_dir``) and return nothing.

Hook points, in the order they fire::

    on_fit_start                      after a resume (if any), before the first epoch
      on_epoch_start(epoch)           epoch counted from 0
        on_optimizer_step(step)       right after an *applied* optimizer step (not after a
                                      batch skipped as non-finite); ``step`` is global, 0-based
        on_batch_end(step, out)       after every batch, applied or skipped
      on_evaluate_start / on_evaluate_end(metrics)
      on_epoch_end(epoch, row)        the epoch's metrics row, before it is checkpointed
      on_save_checkpoint(state)       add picklable entries to ``state`` (under your own key)
      on_checkpoint_saved(epoch, step) the checkpoint after ``epoch`` epochs and ``step``
                                      steps is complete on disk (e.g. copy it elsewhere)
    on_fit_end(result)
    on_load_checkpoint(state)         when resuming, with the state a save wrote

A callback that keeps state between steps (a counter, a momentum) should keep it in
tensors of a module the checkpoint already holds, or write it in ``on_save_checkpoint``
and read it back in ``on_load_checkpoint``, so that a resumed run continues exactly.

**Metrics.** ``trainer.log_metric(name, value)`` records a diagnostic for the current
epoch; the epoch's row holds its mean as ``train_<name>``. Models do the same by returning
``{"metrics": {name: tensor}}`` next to ``loss`` from ``forward`` — whatever the name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: the trainer imports this module
    from kdistill.trainer import FitResult, Trainer

__all__ = ["Callback", "CallbackList", "LambdaCallback"]


class Callback:
    """Base class: override the hooks you need; each default does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_optimizer_step(self, trainer: Trainer, step: int) -> None: ...

    def on_batch_end(self, trainer: Trainer, step: int, out: Mapping[str, Any]) -> None: ...

    def on_evaluate_start(self, trainer: Trainer) -> None: ...

    def on_evaluate_end(self, trainer: Trainer, metrics: Mapping[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: MutableMapping[str, Any]) -> None: ...

    def on_save_checkpoint(self, trainer: Trainer, state: MutableMapping[str, Any]) -> None: ...

    def on_checkpoint_saved(self, trainer: Trainer, epoch: int, step: int) -> None: ...

    def on_load_checkpoint(self, trainer: Trainer, state: Mapping[str, Any]) -> None: ...

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None: ...


class LambdaCallback(Callback):
    """A callback from keyword functions, e.g. ``LambdaCallback(on_optimizer_step=fn)``."""

    def __init__(self, **hooks: Any) -> None:
        unknown = sorted(set(hooks) - set(_HOOKS))
        if unknown:
            raise TypeError(f"unknown callback hooks {unknown}; the hooks are {list(_HOOKS)}")
        for name, fn in hooks.items():
            setattr(self, name, lambda *args, _fn=fn: _fn(*args))


_HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


class CallbackList:
    """Calls a hook on every callback, in the order they were given."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"{type(callback).__name__} is not a kdistill.callbacks.Callback; "
                    "subclass it (or use LambdaCallback)"
                )

    def __iter__(self) -> Any:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
