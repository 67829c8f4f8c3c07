"""DistilBERT-style students: a shallower copy of a Hugging Face teacher.

DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of BERT: smaller, faster,
cheaper and lighter", §3) keeps the teacher's width, halves its depth and initialises the
student "from the teacher by taking one layer out of two". The same recipe is the usual
starting point for shallow causal-LM students (e.g. every third layer of a 30-layer Llama).
:func:`init_student_from_teacher` builds such a student:

* the config is the teacher's with ``num_hidden_layers`` set to the student's depth
  (per-layer config lists such as ``layer_types`` are re-indexed with the layer map);
* a fresh model of the teacher's class is built from it, so every layer gets its own,
  correct ``layer_idx`` (the KV cache of a causal LM indexes by it);
* the teacher's weights are copied in: student layer ``i`` ← teacher layer
  ``layer_map[i]``; everything outside the layer stack (embeddings, the final norm,
  BERT's pooler, ``lm_head``, task heads) unchanged. Tied input/output embeddings stay tied.

Supported layouts (the stack of blocks, found by module name):

* BERT-like encoders: ``encoder.layer`` (``BertModel``; ``bert.encoder.layer`` in
  ``BertForMaskedLM`` / ``BertForSequenceClassification``; RoBERTa, ELECTRA, MiniLM ...).
* Llama-like decoders: ``layers`` (``LlamaModel``; ``model.layers`` in
  ``LlamaForCausalLM``; Mistral, Qwen2, SmolLM2 ...).

With the identity map (``layer_map = range(L)``) the student is an exact copy of the
teacher; that is how the copy is tested.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "SUPPORTED_LAYER_STACKS",
    "default_layer_map",
    "find_layer_stack",
    "init_student_from_teacher",
]

# Module-name suffix of the block stack -> the family it stands for (for error messages).
SUPPORTED_LAYER_STACKS: dict[str, str] = {
    "encoder.layer": "BERT-like encoder (BertModel, BertForMaskedLM, RobertaModel, MiniLM ...)",
    "layers": "Llama-like decoder (LlamaModel, LlamaForCausalLM, MistralForCausalLM, Qwen2 ...)",
}


def _supported_text() -> str:
    return "; ".join(f"`{suffix}` = {family}" for suffix, family in SUPPORTED_LAYER_STACKS.items())


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the model's stack of transformer blocks.

    The stack is the one :class:`~torch.nn.ModuleList` whose name ends with a key of
    :data:`SUPPORTED_LAYER_STACKS` (``encoder.layer`` or ``layers``) and whose length is
    ``model.config.num_hidden_layers``.

    Raises:
        TypeError: if the model has no ``config.num_hidden_layers``, or no such stack, or
            more than one; the message names the model class and the supported layouts.
    """
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise TypeError(
            f"{type(model).__name__} has no `config.num_hidden_layers`; "
            "init_student_from_teacher needs a Hugging Face transformers model. "
            f"Supported layer stacks: {_supported_text()}."
        )
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != depth:
            continue
        if any(name == s or name.endswith("." + s) for s in SUPPORTED_LAYER_STACKS):
            found.append((name, module))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise TypeError(
            f"unsupported architecture {type(model).__name__} "
            f"(model_type={getattr(config, 'model_type', '?')!r}): found {what} stack(s) "
            f"of {depth} blocks. Supported layer stacks: {_supported_text()}."
        )
    return found[0]


def default_layer_map(num_teacher_layers: int, num_layers: int | None = None) -> list[int]:
    """Evenly spaced teacher layers ``floor(i · L / n)``, ``i = 0 .. n − 1``.

    ``n`` defaults to ``L // 2`` — DistilBERT's one layer out of two: 12 → ``[0, 2, ..., 10]``,
    6 → ``[0, 2, 4]``. 30 layers with ``n = 10`` gives every third layer ``[0, 3, ..., 27]``.

    Raises:
        ValueError: if ``num_layers`` is not in ``1 .. num_teacher_layers``.
    """
    if num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers must be >= 1, got {num_teacher_layers}")
    n = max(1, num_teacher_layers // 2) if num_layers is None else num_layers
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= num_teacher_layers:
        raise ValueError(
            f"num_layers must be an int in 1..{num_teacher_layers} (the teacher's depth), "
            f"got {num_layers!r}"
        )
    return [(i * num_teacher_layers) // n for i in range(n)]


def _check_layer_map(
    layer_map: Sequence[int], num_teacher_layers: int, num_layers: int | None
) -> list[int]:
    indices = list(layer_map)
    if not indices:
        raise ValueError("layer_map is empty: give at least one teacher layer index")
    bad_type = [i for i in indices if not isinstance(i, int) or isinstance(i, bool)]
    if bad_type:
        raise ValueError(f"layer_map must hold ints (teacher layer indices), got {bad_type!r}")
    out_of_range = [i for i in indices if not 0 <= i < num_teacher_layers]
    if out_of_range:
        raise ValueError(
            f"layer_map {indices} has indices {out_of_range} out of range: the teacher has "
            f"{num_teacher_layers} layers, so indices must be in 0..{num_teacher_layers - 1}"
        )
    if num_layers is not None and len(indices) != num_layers:
        raise ValueError(
            f"layer_map has {len(indices)} entries but num_layers={num_layers}: give one "
            "teacher index per student layer, or leave num_layers out"
        )
    return indices


def _reindex_config(config: Any, layer_map: list[int], depth: int) -> Any:
    """The teacher's config with the student's depth and per-layer lists re-indexed."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layer_map)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == depth:
        config.layer_types = [layer_types[j] for j in layer_map]
    return config


def init_student_from_teacher(
    teacher: nn.Module,
    num_layers: int | None = None,
    layer_map: Sequence[int] | None = None,
) -> nn.Module:
    """Build a shallower student of the teacher's class and width from its layers.

    Args:
        teacher: a Hugging Face model with a BERT-like (``encoder.layer``) or Llama-like
            (``layers``) block stack (see :data:`SUPPORTED_LAYER_STACKS`). Not modified.
        num_layers: the student's depth ``n``. Default: ``len(layer_map)`` if a map is
            given, else ``L // 2`` (DistilBERT).
        layer_map: teacher layer index for each student layer (length ``n``; repeats and
            any order allowed). Default: :func:`default_layer_map` (``floor(i · L / n)``:
            ``[0, 2, 4]`` for 6 → 3 layers).

    Returns:
        A new model of ``type(teacher)`` with ``config.num_hidden_layers = n``, on the
        teacher's device and dtype, in the teacher's train/eval mode. Its parameters are
        copies (no storage is shared with the teacher); student layer ``i`` equals teacher
        layer ``layer_map[i]``, all other weights equal the teacher's, and input/output
        embeddings are tied iff they are tied in the teacher.

    Raises:
        TypeError: unsupported architecture (names the supported layouts).
        ValueError: a layer map with out-of-range or non-int indices, or whose length is
            not ``num_layers``.
    """
    stack_name, stack = find_layer_stack(teacher)
    depth = len(stack)
    if layer_map is None:
        indices = default_layer_map(depth, num_layers)
    else:
        indices = _check_layer_map(layer_map, depth, num_layers)

    config = _reindex_config(teacher.config, indices, depth)
    reference = next(teacher.parameters())
    student = type(teacher)(config).to(device=reference.device, dtype=reference.dtype)

    # Teacher state dict with the stack re-indexed: "<stack>.<i>.<rest>" <- "<stack>.<j>.<rest>".
    prefix = f"{stack_name}." if stack_name else ""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    teacher_state = teacher.state_dict()
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher_state.items():
        match = pattern.match(key)
        if match:
            per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            state[key] = value
    for i, j in enumerate(indices):
        for rest, value in per_layer.get(j, {}).items():
            state[f"{prefix}{i}.{rest}"] = value

    missing, unexpected = student.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq, BERT's position_ids) are rebuilt by the
    # constructor; anything else missing means the copy is incomplete.
    student_persistent = set(student.state_dict())
    missing = [k for k in missing if k in student_persistent]
    if missing or unexpected:
        raise RuntimeError(
            f"copying {type(teacher).__name__} into a {len(indices)}-layer student left "
            f"missing keys {missing[:5]} and unexpected keys {unexpected[:5]}; this layout "
            "is not supported"
        )
    _match_tying(teacher, student)
    student.train(teacher.training)
    return student


def _embeddings(model: nn.Module) -> tuple[Any, Any]:
    """``(input, output)`` embedding modules of an HF model; ``None`` where it has none."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return (get_in() if callable(get_in) else None, get_out() if callable(get_out) else None)


def _match_tying(teacher: nn.Module, student: nn.Module) -> None:
    """Tie the student's output embedding to its input embedding iff the teacher's are."""
    t_in, t_out = _embeddings(teacher)
    s_in, s_out = _embeddings(student)
    if t_in is None or t_out is None or s_in is None or s_out is None:
        return
    teacher_tied = t_in.weight is t_out.weight
    student_tied = s_in.weight is s_out.weight
    if teacher_tied and not student_tied:
        s_out.weight = s_in.weight
    elif student_tied and not teacher_tied:
        # Loading both keys into one shared tensor kept only the last; split and reload.
        s_out.weight = nn.Parameter(t_out.weight.detach().clone())
        with torch.no_grad():
            s_in.weight.copy_(t_in.weight)
        if hasattr(student.config, "tie_word_embeddings"):
            student.config.tie_word_embeddings = False
