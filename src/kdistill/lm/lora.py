"""LoRA students through ``peft``, their saved forms, and gradient checkpointing.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes each
targeted weight ``W₀ (out, in)`` and learns a low-rank update::

    h = W₀ x + (α / r) · B A x,     A: (r, in), B: (out, r),  B = 0 at the start

so a fresh LoRA student computes exactly what its base computes, and only
``r · (in + out)`` numbers per targeted layer are trained. ``target_modules`` defaults to
``all-linear`` (every linear layer but the output head): QLoRA (Dettmers et al. 2023)
found adapting all linear layers necessary to match full fine-tuning.

Usage::

    student = apply_lora(student, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    trainable_parameter_count(student)          # the LoRA A and B matrices only
    ...                                         # distil as usual: model(**inputs) is unchanged
    save_student(student, tokenizer, run_dir / "student", weights_path=run_dir / "student.safetensors")

:func:`save_student` writes the student in every form a user loads: a merged
``save_pretrained`` folder (plain ``transformers`` / vLLM-style servers load it as is), the
adapter (``peft.PeftModel.from_pretrained(base, folder / "adapter")``) with the base it
applies to, and optionally one merged ``.safetensors`` file with the Hugging Face key names.
Under a LoRA student, feature taps name layers through the wrapper
(``base_model.model.model.layers.1``); :func:`peft_layer_name` maps a plain name to it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.config import ConfigError

__all__ = [
    "ALL_LINEAR",
    "LoRAConfig",
    "SavedStudent",
    "apply_lora",
    "enable_gradient_checkpointing",
    "is_lora",
    "lora_target_names",
    "merged_copy",
    "peft_layer_name",
    "save_student",
    "trainable_parameter_count",
]

ALL_LINEAR = "all-linear"
"""peft's shorthand: every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output layer."""


def _peft() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA students need peft: pip install 'kdistill[lm]'") from err
    return peft


# --------------------------------------------------------------------------- config


@dataclass
class LoRAConfig:
    """``student.lora``: rank ``r``, scale ``alpha`` (the update is ``(alpha / r) B A``),
    ``dropout`` on the adapter's input, and ``target_modules`` — layer names (a name matches
    a module whose dotted path ends with it: ``q_proj`` matches ``model.layers.0.self_attn
    .q_proj``) or ``all-linear``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default=ALL_LINEAR)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"student.lora.r: the rank must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ConfigError(f"student.lora.alpha: must be a number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ConfigError(f"student.lora.alpha: must be > 0, got {self.alpha}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"student.lora.dropout: must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"student.lora.dropout: must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ConfigError(
                    f"student.lora.target_modules: a list of layer names (e.g. [q_proj, v_proj])"
                    f" or {ALL_LINEAR!r}; got the string {targets!r}"
                )
        elif (
            not isinstance(targets, Sequence)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(
                "student.lora.target_modules: must be a non-empty list of layer names "
                f"(e.g. [q_proj, v_proj]) or {ALL_LINEAR!r}; got {targets!r}"
            )
        else:
            self.target_modules = list(targets)


# --------------------------------------------------------------------------- applying


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (a LoRA student)."""
    try:
        return isinstance(model, _peft().PeftModel)
    except ImportError:
        return False


def _adaptable(module: nn.Module) -> bool:
    """Layer types peft's LoRA can wrap."""
    if isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer (weight transposed)


def lora_target_names(model: nn.Module) -> list[str]:
    """The short names (last path component) of the layers LoRA can adapt, sorted."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _adaptable(m)}
    )


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    modules = dict(model.named_modules())
    available = ", ".join(lora_target_names(model))
    for target in targets:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise ConfigError(
                f"student.lora.target_modules: the student ({type(model).__name__}) has no "
                f"layer named {target!r}; layers LoRA can adapt: {available}"
            )
        wrong = [n for n in hits if not _adaptable(modules[n])]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            raise ConfigError(
                f"student.lora.target_modules: {wrong[0]!r} is a {kind}, not a linear, "
                f"embedding or convolution layer; layers LoRA can adapt: {available}"
            )


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model: base weights frozen, ``A`` random, ``B = 0``.

    The returned model is called as before (``model(**inputs)``) and computes the base's
    outputs until it is trained. Raises :class:`ConfigError` naming an unknown or
    unadaptable target layer with the names available.
    """
    peft = _peft()
    if is_lora(model):
        raise ConfigError("student.lora: the student already has LoRA adapters")
    if isinstance(cfg.target_modules, list):
        _check_targets(model, cfg.target_modules)
    causal = type(model).__name__.endswith("ForCausalLM")
    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type=peft.TaskType.CAUSAL_LM if causal else None,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. all-linear on a model without linear layers
        raise ConfigError(f"student.lora: {err}") from None


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters that take gradients, each shared (tied) tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad)


def peft_layer_name(model: nn.Module, name: str) -> str:
    """A plain layer name (``model.layers.1``) as it is called inside a LoRA student
    (``base_model.model.model.layers.1``); unchanged for other models."""
    if is_lora(model) and not name.startswith("base_model.model."):
        return f"base_model.model.{name}"
    return name


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with ``W₀ + (α / r) B A`` in each adapted layer; ``model`` is untouched.

    Copies the model (twice its memory for a moment) rather than merging in place and
    unmerging, which would leave ``W₀`` off by a rounding error. Non-LoRA models are returned
    as they are.
    """
    if not is_lora(model):
        return model
    wrapped: Any = copy.deepcopy(model)
    return wrapped.merge_and_unload(safe_merge=True)


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class SavedStudent:
    """Where :func:`save_student` wrote each form (``None``: not written)."""

    merged: Path
    adapter: Path | None = None
    base: Path | None = None
    weights: Path | None = None


def _base_path(model: Any) -> str:
    config = next(iter(model.peft_config.values()))
    return config.base_model_name_or_path or ""


def save_student(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    *,
    weights_path: str | os.PathLike[str] | None = None,
) -> SavedStudent:
    """Write a Hugging Face student (LoRA or not) in the forms users load.

    - ``folder/``: ``save_pretrained`` of the merged model (``config.json``,
      ``model.safetensors``) and of ``tokenizer`` when it has ``save_pretrained``:
      ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it as is.
    - ``folder/adapter/`` (LoRA only): ``adapter_config.json`` + ``adapter_model.safetensors``
      for ``peft.PeftModel.from_pretrained(base, folder / "adapter")``. Its
      ``base_model_name_or_path`` is the folder the student was loaded from; a student built
      from a config has no such folder, so its initial weights are written to
      ``folder/adapter/base/`` and recorded there instead (absolute path).
    - ``weights_path`` (optional): the merged weights as one safetensors file with the
      Hugging Face key names (``model.load_state_dict(load_file(path))``), e.g. the run's
      ``student.safetensors``.

    Pass the unwrapped model (not a DDP / FSDP wrapper).
    """
    from kdistill.checkpoint import save_weights
    from kdistill.distiller import untie_shared_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merged: Any = merged_copy(model)
    student: Any = model  # a peft / transformers model: their methods are untyped here
    if not hasattr(merged, "save_pretrained"):
        raise ConfigError(
            f"save_student: the student ({type(merged).__name__}) is not a Hugging Face model "
            "(no save_pretrained)"
        )
    merged.save_pretrained(str(folder))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    adapter = base = None
    if is_lora(model):
        adapter = folder / "adapter"
        recorded = _base_path(student)
        if not recorded or not Path(recorded).is_dir():
            base = adapter / "base"
            copy.deepcopy(student).unload().save_pretrained(str(base))
            for config in student.peft_config.values():  # recorded in adapter_config.json
                config.base_model_name_or_path = str(base.absolute())
        try:
            student.save_pretrained(str(adapter))
        finally:
            for config in student.peft_config.values():
                config.base_model_name_or_path = recorded
    weights = None
    if weights_path is not None:
        weights = Path(weights_path)
        state = untie_shared_tensors(merged.state_dict())
        save_weights(weights, state, metadata={"format": "pt"})
    return SavedStudent(folder, adapter, base, weights)


# --------------------------------------------------------------------------- memory


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block's activations in the backward pass (Chen et al.
    2016, "Training Deep Nets with Sublinear Memory Cost") instead of storing them.

    Hugging Face models only (``gradient_checkpointing_enable``; active in train mode),
    non-reentrant, so gradients also reach LoRA adapters behind frozen embeddings; the KV
    cache is turned off (useless in training). Gradients are those without checkpointing.
    Returns ``model``.
    """
    student: Any = model
    base: Any = student.get_base_model() if is_lora(model) else model
    if not callable(getattr(base, "gradient_checkpointing_enable", None)) or not getattr(
        base, "supports_gradient_checkpointing", False
    ):
        raise ConfigError(
            f"student.gradient_checkpointing: the student ({type(base).__name__}) is not a "
            "Hugging Face model that supports gradient checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if callable(getattr(base, "activation_checkpointing_enable", None)):  # transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return model
