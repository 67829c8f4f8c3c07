"""A distiller is a teacher, a student, and a weighted list of loss terms.

Each :class:`LossTerm` names the two tensors it compares — the student's ``"logits"`` (the
model output) or any layer by its ``named_modules()`` name, against the teacher's logits or
layer, or against the labels — and holds its loss module and, when shapes differ, an
adapter that maps the student tensor onto the teacher's. Terms are submodules, so adapter
parameters are seen by the optimizer and saved in checkpoints.

The teacher is frozen here and only here (:func:`freeze`): no gradients, evaluated under
``torch.inference_mode``, and kept in eval mode even when the distiller is put in training
mode (as mdistiller's ``Distiller.train`` does).

Inputs are a tensor (``model(x)``) or a mapping of tensors passed as keyword arguments
(``model(**inputs)``, e.g. Hugging Face ``input_ids`` / ``attention_mask``); a model's
output is a tensor or anything with ``logits`` (a Hugging Face ``ModelOutput``) — see
:func:`call_model` and :func:`output_logits`. For mapping inputs, losses that declare
``requires_mask = True`` also get the batch's ``attention_mask`` ``(B, T)`` as ``mask=``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from kdistill.adapters import make_adapter
from kdistill.taps import FeatureTaps

LOGITS = "logits"
"""The name that selects a model's own output instead of an inner layer."""

Inputs: TypeAlias = Tensor | Mapping[str, Tensor]
"""A model input: one tensor, or keyword tensors such as ``input_ids`` and ``attention_mask``."""

IGNORE_INDEX = -100
"""A target equal to this does not count (padding and prompt tokens, unlabelled rows of
token batches), as in Hugging Face and ``torch.nn.functional.cross_entropy``."""

TEACHER_INPUTS = "teacher_inputs"
"""Batch entry with the teacher's own inputs (a teacher with another tokenizer)."""

ATTENTION_MASK = "attention_mask"
"""The key of mapping inputs that is handed to ``requires_mask`` losses as ``mask=``."""


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a mapping of tensors (Hugging Face style), else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def output_logits(output: Any) -> Tensor:
    """The logits in a model's output.

    A tensor is returned as is. A Hugging Face ``ModelOutput`` (or any mapping / object)
    gives its ``logits``; a headless encoder without ``logits`` gives its
    ``last_hidden_state`` ``(B, T, H)``.

    Raises:
        TypeError: the output holds neither.
    """
    if isinstance(output, Tensor):
        return output
    for key in (LOGITS, "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    keys = list(output.keys()) if isinstance(output, Mapping) else type(output).__name__
    raise TypeError(
        f"cannot find logits in a model output of {keys}: return a tensor, or an object with "
        "`logits` (or `last_hidden_state`) such as a Hugging Face ModelOutput"
    )


def input_device(inputs: Inputs) -> torch.device:
    """The device of a tensor input, or of the first tensor of a mapping input."""
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            if isinstance(value, Tensor):
                return value.device
        raise ValueError(f"mapping inputs hold no tensor: keys {sorted(inputs)}")
    return inputs.device


def untie_shared_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``state`` in which tensors sharing storage with an earlier entry are cloned.

    Tied weights (a Hugging Face ``lm_head`` sharing the input embedding) appear twice in
    ``state_dict()``; safetensors refuses to save shared storage. Cloning keeps both keys, so
    ``load_state_dict`` (strict) of the result restores the same, still tied, model.
    """
    seen: set[tuple[torch.device, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        ptr = (value.device, value.untyped_storage().data_ptr()) if value.numel() else None
        if ptr is not None and ptr in seen:
            value = value.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    return out


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher in place: no parameter takes gradients, eval mode. Returns it."""
    model.requires_grad_(False)
    return model.eval()


AUTO = "auto"
"""Pass ``adapter="auto"`` to build the adapter from a dry run (:meth:`Distiller.build_adapters`)."""


class LossTerm(nn.Module):
    """One weighted loss comparing a student tensor with a teacher tensor or the labels.

    Args:
        name: label used in logs and in the output dict (``"<name>_loss"``).
        loss: called as ``loss(student_tensor, reference)``; any ``nn.Module``. Losses with
            ``requires_target = True`` also get the labels, those with ``requires_index =
            True`` the dataset indices (``index=``), e.g. DKD and CRD, and those with
            ``batch_keys = ("name", ...)`` those entries of the batch as keywords (e.g. the
            token alignment of a cross-tokenizer loss).
        weight: factor of this term in the total loss.
        student: ``"logits"`` or a student module name.
            Losses with ``requires_mask = True`` also get the ``attention_mask`` of
            mapping inputs as ``mask=`` (``None`` for tensor inputs).
        teacher: ``"logits"``, a teacher module name, or ``None`` to compare with labels.
        adapter: module applied to the student tensor first (e.g. a 1×1 conv when the
            student layer is narrower than the teacher's, as in FitNets); ``"auto"`` builds
            one from a dry run when the loss needs equal shapes and they differ.
        warmup_epochs: ramp the weight linearly from 0 over this many epochs (DKD's
            warm-up, Zhao et al. 2022); 0 applies the full weight from the start.
    """

    def __init__(
        self,
        name: str,
        loss: nn.Module,
        weight: float = 1.0,
        student: str = LOGITS,
        teacher: str | None = LOGITS,
        adapter: nn.Module | str | None = None,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"loss term {name!r}: weight must be >= 0, got {weight}")
        if not warmup_epochs >= 0:
            raise ValueError(f"loss term {name!r}: warmup_epochs must be >= 0, got {warmup_epochs}")
        if isinstance(adapter, str) and adapter != AUTO:
            raise ValueError(f"loss term {name!r}: adapter must be a module, None or 'auto'")
        self.name = name
        self.loss = loss
        self.weight = float(weight)
        self.student = student
        self.teacher = teacher
        self.auto_adapter = adapter == AUTO
        self.adapter = adapter if isinstance(adapter, nn.Module) else None
        self.warmup_epochs = float(warmup_epochs)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None

    def weight_at(self, epoch: float) -> float:
        """The weight after ``epoch`` (fractional) epochs of training."""
        if self.warmup_epochs > 0:
            return self.weight * min(1.0, epoch / self.warmup_epochs)
        return self.weight

    def forward(
        self,
        student_value: Tensor,
        reference: Tensor,
        target: Tensor | None = None,
        index: Tensor | None = None,
        mask: Tensor | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> Tensor:
        if self.adapter is not None:
            student_value = self.adapter(student_value)
        args: list[Tensor] = [student_value, reference]
        kwargs: dict[str, Tensor | None] = {}
        if getattr(self.loss, "requires_target", False):
            if target is None:
                raise ValueError(
                    f"loss term {self.name!r} ({type(self.loss).__name__}) needs labels"
                )
            args.append(target)
        if getattr(self.loss, "requires_index", False):
            if index is None:
                raise ValueError(
                    f"loss term {self.name!r} ({type(self.loss).__name__}) needs the dataset "
                    "index of each sample; pass index= to the distiller"
                )
            kwargs["index"] = index
        if getattr(self.loss, "requires_mask", False):
            kwargs["mask"] = mask
        for key in getattr(self.loss, "batch_keys", ()):  # more of the batch (an alignment)
            if extras is None or key not in extras:
                raise ValueError(
                    f"loss term {self.name!r} ({type(self.loss).__name__}) needs the batch "
                    f"entry {key!r}, which the data loader does not provide"
                )
            kwargs[key] = extras[key]
        try:
            return self.loss(*args, **kwargs)
        except ValueError as err:  # name the term and its tensors in shape errors
            raise ValueError(
                f"loss term {self.name!r} (student {self.student!r} {tuple(student_value.shape)} "
                f"vs {self.teacher or 'labels'!r} {tuple(reference.shape)}): {err}"
            ) from err

    def extra_repr(self) -> str:
        other = self.teacher if self.teacher is not None else "labels"
        return f"name={self.name!r}, weight={self.weight}, student={self.student!r} vs {other!r}"


class Distiller(nn.Module):
    """Teacher + student + weighted loss terms; ``forward`` returns the loss and its parts.

    Args:
        student: any ``nn.Module`` mapping inputs to logits (a tensor, or an output with
            ``logits`` such as a Hugging Face ``ModelOutput``).
        terms: the loss terms; their weighted sum is the training loss.
        teacher: any ``nn.Module``; frozen here. May be ``None`` when no term uses it
            (plain supervised training, label smoothing) or when teacher outputs are always
            passed in precomputed (a teacher-output cache).

    ``forward(inputs, target, teacher_outputs=None)`` — ``inputs`` a tensor or a mapping of
    keyword tensors (:func:`call_model`) — returns a dict with ``loss`` (the
    weighted sum, with gradients), ``logits`` (the student's, detached) and one detached,
    unweighted ``"<term>_loss"`` per term for logging.
    """

    def __init__(
        self,
        student: nn.Module,
        terms: Sequence[LossTerm],
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a Distiller needs at least one loss term")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.terms = nn.ModuleList(terms)
        self._student_taps = FeatureTaps(student, self._layers(student=True))
        self._teacher_taps = (
            FeatureTaps(teacher, self._layers(student=False)) if teacher is not None else None
        )
        self.progress = 0.0  # epochs trained so far (fractional), for weight schedules

    def drop_teacher(self) -> None:
        """Forget the live teacher once its outputs come from a cache (frees its memory)."""
        self.teacher = None
        self._teacher_taps = None

    def set_progress(self, epoch: float) -> None:
        """Tell the terms how far training is (in epochs), for their weight schedules."""
        self.progress = float(epoch)

    # -- what the terms need ---------------------------------------------------------

    def _layers(self, student: bool) -> list[str]:
        keys = [term.student if student else term.teacher for term in self.terms]
        return sorted({k for k in keys if k is not None and k != LOGITS})

    @property
    def needs_teacher(self) -> bool:
        return any(term.uses_teacher for term in self.terms)

    @property
    def teacher_keys(self) -> list[str]:
        """The teacher tensors the terms compare against (``"logits"`` and/or layers)."""
        return sorted({t.teacher for t in self.terms if t.teacher is not None})

    # -- modes and parameters --------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        """Set training mode on the student and terms; the teacher always stays in eval."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and adapter parameters — what the optimizer updates."""
        for param in self.parameters():
            if param.requires_grad:
                yield param

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Student and term (adapter) weights: what a checkpoint must hold. No teacher.

        Tied tensors (e.g. an ``lm_head`` sharing the embedding) are cloned, so that the
        dict can be saved as safetensors (:func:`untie_shared_tensors`).
        """
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"terms.{k}": v for k, v in self.terms.state_dict().items()})
        return untie_shared_tensors(state)

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        student = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
        terms = {k[len("terms.") :]: v for k, v in state.items() if k.startswith("terms.")}
        self.student.load_state_dict(student)
        self.terms.load_state_dict(terms)

    # -- shapes and adapters -----------------------------------------------------------

    @torch.no_grad()
    def probe_shapes(self, inputs: Inputs) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
        """Shapes of every tensor the terms compare, from one forward of each model in eval mode.

        Returns ``(student_shapes, teacher_shapes)`` keyed by ``"logits"`` or layer name.
        """
        return probe_shapes(self.student, self._layers(student=True), inputs), (
            probe_shapes(self.teacher, self._layers(student=False), inputs)
            if self.teacher is not None
            else {}
        )

    def build_adapters(self, inputs: Inputs) -> list[str]:
        """Create the ``adapter="auto"`` adapters whose shapes differ; returns their term names.

        Needs the live teacher. Call before building the optimizer, so it sees the adapters.
        """
        pending = [t for t in self.terms if t.auto_adapter and t.adapter is None and t.uses_teacher]
        if not pending:
            return []
        student_shapes, teacher_shapes = self.probe_shapes(inputs)
        built = []
        for term in pending:
            s, t = student_shapes[term.student], teacher_shapes[term.teacher]
            if s[1:] != t[1:] and getattr(term.loss, "same_shape", False):
                term.adapter = make_adapter(s, t).to(input_device(inputs))
                built.append(term.name)
        return built

    # -- forward ---------------------------------------------------------------------

    @torch.inference_mode()
    def _teacher_inference(self, inputs: Inputs) -> dict[str, Tensor]:
        assert self.teacher is not None and self._teacher_taps is not None
        with self._teacher_taps:
            logits = output_logits(call_model(self.teacher, inputs))
            outputs = self._teacher_taps.pop()
        outputs[LOGITS] = logits
        return outputs

    def teacher_forward(self, inputs: Inputs) -> dict[str, Tensor]:
        """The teacher's logits and tapped layers, computed without autograd.

        Outputs are cloned out of inference mode so that losses may save them for backward.
        """
        if self.teacher is None:
            raise RuntimeError(
                "this Distiller has no teacher; pass teacher_outputs to forward() or give a teacher"
            )
        return {k: v.clone() for k, v in self._teacher_inference(inputs).items()}

    def forward(
        self,
        inputs: Inputs,
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """The weighted loss and its parts.

        ``extras``: the batch's other entries (see :func:`kdistill.trainer.batch_extras`);
        ``extras["teacher_inputs"]``, when present, is what the live teacher reads instead of
        ``inputs`` (a teacher with its own tokenizer); terms whose loss lists ``batch_keys``
        get those entries.
        """
        with self._student_taps as taps:
            logits = output_logits(call_model(self.student, inputs))  # (B, C) or (B, T, V)
            student_values = taps.pop()
        student_values[LOGITS] = logits

        teacher_values: Mapping[str, Tensor] = {}
        if self.needs_teacher:
            teacher_in = (extras or {}).get(TEACHER_INPUTS, inputs)
            teacher_values = (
                teacher_outputs if teacher_outputs is not None else self.teacher_forward(teacher_in)
            )

        mask = inputs.get(ATTENTION_MASK) if isinstance(inputs, Mapping) else None
        total = logits.new_zeros((), dtype=torch.float32)
        result: dict[str, Tensor] = {}
        for term in self.terms:
            reference = self._reference(term, teacher_values, target)
            value = term(student_values[term.student], reference, target, index, mask, extras)
            total = total + term.weight_at(self.progress) * value
            result[f"{term.name}_loss"] = value.detach()
        result["loss"] = total
        result["logits"] = logits.detach()
        return result

    @staticmethod
    def _reference(
        term: LossTerm, teacher_values: Mapping[str, Tensor], target: Tensor | None
    ) -> Tensor:
        if term.teacher is None:
            if target is None:
                raise ValueError(
                    f"loss term {term.name!r} compares with labels, but none were given"
                )
            return target
        if term.teacher not in teacher_values:
            raise KeyError(
                f"loss term {term.name!r} needs teacher output {term.teacher!r}, but the given "
                f"teacher_outputs hold only {sorted(teacher_values)}"
            )
        return teacher_values[term.teacher]


@torch.no_grad()
def probe_shapes(model: nn.Module, layers: Sequence[str], inputs: Inputs) -> dict[str, torch.Size]:
    """Output shapes of ``model`` (as ``"logits"``) and its named ``layers`` on ``inputs``.

    Runs in eval mode (so BatchNorm running statistics are untouched) and restores the mode.
    """
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, list(layers)) as taps:
            logits = output_logits(call_model(model, inputs))
            shapes = {name: value.shape for name, value in taps.pop().items()}
    finally:
        model.train(was_training)
    shapes[LOGITS] = logits.shape
    return shapes
