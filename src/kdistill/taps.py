"""Feature taps: read intermediate outputs of any ``nn.Module`` by name.

Feature distillation (FitNets, attention transfer, ...) needs the output of
inner layers of both teacher and student. Rewriting models to return those
tensors couples the library to every architecture, so instead we attach
forward hooks to the submodules named in ``model.named_modules()`` and record
what they return. The model itself is never modified; hooks are removed when
the taps are removed.

Example::

    with FeatureTaps(model, ["layer1", "fc"]) as taps:
        logits = model(x)
    feats = taps.outputs  # {"layer1": Tensor, "fc": Tensor}

Recorded tensors are *not* detached: student features must carry gradients
back into the student. Detach teacher features (or run the teacher under
``torch.no_grad()``) yourself.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTaps", "first_tensor", "module_names"]

_MAX_SUGGESTIONS = 5


def module_names(model: nn.Module) -> list[str]:
    """Return every name that :class:`FeatureTaps` accepts for ``model``.

    These are the names of ``model.named_modules()``; ``""`` is the model
    itself. Print this list to find the layer you want to tap.
    """
    return [name for name, _ in model.named_modules()]


def first_tensor(output: Any) -> Tensor:
    """Pull the feature tensor out of whatever a module's forward returned.

    Modules do not all return a bare tensor, so a tap needs one rule to pick
    "the" feature:

    - a tensor is returned as is;
    - a mapping (e.g. a Hugging Face ``ModelOutput``) gives its
      ``last_hidden_state`` if present, else its first tensor value;
    - a tuple/list (e.g. HF decoder layers, ``nn.LSTM``'s ``(out, (h, c))``)
      gives its first tensor element, searching nested containers depth-first.

    Raises:
        TypeError: if the output holds no tensor at all.
    """
    found = _find_first_tensor(output)
    if found is None:
        raise TypeError(
            f"cannot take a feature tensor from an output of type {type(output).__name__}: "
            "it holds no tensor. Tap a module that returns a tensor, a tuple/list "
            "of tensors, or a mapping with tensor values."
        )
    return found


def _find_first_tensor(output: Any) -> Tensor | None:
    """Depth-first search for the first tensor; ``None`` when there is none."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        hidden = output.get("last_hidden_state")
        if isinstance(hidden, Tensor):
            return hidden
        values: Any = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        found = _find_first_tensor(value)
        if found is not None:
            return found
    return None


def _unknown_name_message(model: nn.Module, name: str, available: list[str]) -> str:
    """Explain an unknown module name and suggest the names the user likely meant."""
    model_type = type(model).__name__
    named = [n for n in available if n]  # "" (the model itself) is not a useful suggestion
    close = difflib.get_close_matches(name, named, n=_MAX_SUGGESTIONS, cutoff=0.6)
    if close:
        hint = "closest: " + ", ".join(repr(n) for n in close)
    elif named:
        shown = ", ".join(repr(n) for n in named[:_MAX_SUGGESTIONS])
        more = f" ... ({len(named)} in total)" if len(named) > _MAX_SUGGESTIONS else ""
        hint = f"available: {shown}{more}"
    else:
        hint = f"{model_type} has no submodules; use '' to tap the model's own output"
    return (
        f"no module named {name!r} in {model_type}; {hint}. "
        "Names come from model.named_modules() (see kdistill.taps.module_names(model))."
    )


class FeatureTaps:
    """Record the outputs of named submodules during forward passes.

    Args:
        model: any ``nn.Module``; it is not modified.
        names: names from ``model.named_modules()`` (dotted paths such as
            ``"blocks.0.conv"``); ``""`` taps the model's own output.
            Duplicates are ignored.

    Use as a context manager for one-off reads, or call :meth:`attach` /
    :meth:`remove` to keep the hooks alive across many training steps (then
    call :meth:`pop` after each forward so outputs never leak between steps).

    Each recorded value is ``first_tensor(module_output)`` (see
    :func:`first_tensor`). If a module runs several times in one forward
    (weight sharing, recurrent unrolling) only its *last* output is kept.
    Outputs are not detached.

    Raises:
        ValueError: if a name is not in ``model.named_modules()``; the message
            lists the closest existing names.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        if isinstance(names, str):
            raise TypeError(
                f"names must be a sequence of module names, got the string {names!r}; "
                f"pass [{names!r}] instead"
            )
        self.model = model
        self._names: list[str] = list(dict.fromkeys(names))  # dedupe, keep order
        self._modules = self._resolve(model, self._names)
        self._handles: list[RemovableHandle] = []
        self._outputs: dict[str, Tensor] = {}
        # One entry per active `with`: did that `with` attach the hooks?
        self._entered_attached: list[bool] = []

    @staticmethod
    def _resolve(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
        """Map each name to its submodule, failing early with a helpful message."""
        # remove_duplicate=False so every alias of a shared module is a valid name.
        by_name = dict(model.named_modules(remove_duplicate=False))
        resolved: dict[str, nn.Module] = {}
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"module names must be strings, got {type(name).__name__} {name!r}")
            if name not in by_name:
                raise ValueError(_unknown_name_message(model, name, list(by_name)))
            resolved[name] = by_name[name]
        return resolved

    # -- properties ---------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The tapped module names, in the order given."""
        return list(self._names)

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    @property
    def outputs(self) -> dict[str, Tensor]:
        """Outputs recorded so far, name -> tensor (a new dict on every access).

        A name is missing if its module has not run since the last
        :meth:`clear` / :meth:`pop`.
        """
        return dict(self._outputs)

    # -- hook lifecycle -----------------------------------------------------

    def attach(self) -> FeatureTaps:
        """Register the forward hooks; does nothing if they already are."""
        if self._handles:
            return self
        for name in self._names:
            module = self._modules[name]
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Unregister the hooks; safe to call when not attached.

        Recorded outputs are kept so they can still be read after removal.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Any:
        """Build the hook that stores ``name``'s output (the last call wins)."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            try:
                self._outputs[name] = first_tensor(output)
            except TypeError as err:
                raise TypeError(f"tapped module {name!r}: {err}") from None

        return hook

    def __enter__(self) -> FeatureTaps:
        # If the taps were already attached (long-lived use), leave them attached on exit.
        self._entered_attached.append(not self.attached)
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        we_attached = self._entered_attached.pop() if self._entered_attached else True
        if we_attached:
            self.remove()

    # -- reading outputs ----------------------------------------------------

    def clear(self) -> None:
        """Drop all recorded outputs (and the graphs they keep alive)."""
        self._outputs.clear()

    def pop(self) -> dict[str, Tensor]:
        """Return the recorded outputs and clear them, so none leak into the next step."""
        outputs = self._outputs
        self._outputs = {}
        return outputs

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._outputs[name]
        except KeyError:
            if name not in self._modules:
                raise KeyError(f"{name!r} is not tapped; tapped names: {self._names}") from None
            raise KeyError(
                f"no output recorded for {name!r}: its module did not run since the last "
                "clear()/pop(). Run the model's forward inside the `with` block or after "
                "attach()."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._outputs

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"FeatureTaps({type(self.model).__name__}, names={self._names}, {state})"
