"""Training on a ``kdistill generate`` file: a served teacher's completions and top-k.

When the teacher cannot sit next to the student (too big, or only reachable through an API),
it answers the prompts once (``kdistill generate``, :mod:`kdistill.serve.generate`) and the
student trains on the answers — the Alpaca / Vicuna / Orca recipe. Each (prompt, sample)
record of the file becomes one example::

    {"input_ids": prompt + completion (+ eos), "prompt_length": P,
     "topk": (values (C, k), indices (C, k), rest_log_mass (C,))}   # only with top-k

**Sequence-level KD** (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the
student's cross-entropy on the teacher's output ``ŷ``, ``−(1/N) Σ_t log q(ŷ_t | x, ŷ_<t)``,
over the completion tokens only (``prompt_length`` masks the prompt in
:class:`~kdistill.lm.batches.CausalLMCollator`). When the teacher stopped by itself
(``finish_reason: stop``) the tokenizer's EOS is appended and is a target too, so the student
learns where an answer ends.

**Token-level KD on the file's top-k** (Hinton et al. 2015 per token): for completion token
``j`` the file holds the teacher's ``k`` largest log-probabilities ``log p_j(v)``; the rest
``R_j = 1 − Σ_{top-k} p_j(v)`` is one bucket "every other id", and the student's ``q_j`` is
coarsened the same way (its mass on the top-k ids, and the sum of the rest). The term is
:func:`kdistill.lm.topk.topk_divergence` between the two ``(k + 1)``-bucket distributions —
for forward KL ::

    KD = (1/N) Σ_j [ Σ_{v ∈ top-k_j} p_j(v) log(p_j(v) / q_j(v)) + R_j log(R_j / Q_j) ]

averaged over the ``N`` completion tokens that have a teacher row (the appended EOS has
none: the row that chose it is not in the file), the same maths as the on-disk top-k
teacher cache. It needs the student to use the teacher's tokenizer: the teacher's tokens
are mapped to the student's ids (:class:`~kdistill.serve.tokens.TokenMap`), and a token the
student's vocabulary does not have is a :class:`~kdistill.config.ConfigError` naming the
file's line — never a silent skip.

Rows travel in a batch as one tensor (:func:`~kdistill.lm.topk.pack_topk`, ``(B, T, 2k +
1)``, row ``t`` the distribution that predicts token ``t + 1``); positions without a teacher
row (prompt, appended EOS, padding) carry the token id :data:`NO_ROW` (``−1``) in their
first index column, which :class:`CoveredTopKTokenKDLoss` leaves out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdistill.config import ConfigError
from kdistill.distiller import IGNORE_INDEX
from kdistill.lm.batches import ByteTokenizer, CausalLMCollator
from kdistill.lm.topk import TOPK, TopKTokenKDLoss, pack_topk
from kdistill.serve.tokens import TokenMap
from kdistill.trainer import TEACHER_PREFIX

if TYPE_CHECKING:
    from kdistill.serve.records import GeneratedExample

__all__ = [
    "NO_ROW",
    "CoveredTopKTokenKDLoss",
    "GeneratedData",
    "GeneratedTopKCollator",
    "load_generated",
    "pack_example_rows",
    "token_map_for",
]

NO_ROW = -1
"""Token id in the first index column of a packed row that has no teacher distribution."""

BYTE_TOKENS = [bytes([b]) for b in range(256)] + [b"<pad>", b"<s>", b"</s>", b"<mask>"]
"""The bytes of each id of :class:`~kdistill.lm.batches.ByteTokenizer`."""


def _records() -> ModuleType:
    """:mod:`kdistill.serve.records` (its client needs the ``serve`` extra's httpx)."""
    try:
        from kdistill.serve import records
    except ImportError as err:
        raise ImportError(
            f"data.generated_file needs kdistill's serve extra ({err}): pip install "
            "'kdistill[serve]'"
        ) from err
    return records


def token_map_for(tokenizer: Any) -> TokenMap:
    """Teacher tokens (text / bytes / id) → this tokenizer's ids."""
    if isinstance(tokenizer, ByteTokenizer):
        return TokenMap.from_table(BYTE_TOKENS)
    return TokenMap.from_tokenizer(tokenizer)


@dataclass
class GeneratedData:
    """The examples of a generated file, split by prompt into train and held-out.

    ``k``: the width of every example's ``topk`` rows, ``None`` when the top-k are not used
    (sequence-level KD alone). ``info``: counts and the file's provenance for the summary.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    k: int | None
    info: dict[str, Any] = field(default_factory=dict)


def _file_k(header: dict[str, Any], records: Sequence[GeneratedExample], path: str) -> int:
    """The file's top-k width, or a :class:`ConfigError` naming ``distill.alpha``."""
    k = int(header.get("settings", {}).get("logprobs") or 0)
    missing = next((r for r in records if not r.has_topk), None)
    if k >= 1 and missing is None:
        return k
    where = f"line {missing.line}" if missing is not None else "its header (logprobs: 0)"
    raise ConfigError(
        f"distill.alpha: > 0 adds token-level KD on the top-k log-probabilities of "
        f"data.generated_file, but {path} has none ({where}); set distill.alpha: 0 for "
        "sequence-level KD alone, or generate again with sampling.logprobs: k > 0"
    )


def _example(
    record: GeneratedExample,
    header: dict[str, Any],
    tokenizer: Any,
    token_map: TokenMap | None,
    k: int | None,
    max_length: int,
) -> tuple[dict[str, Any] | None, str]:
    """One record → an example (``None`` and why when it has no target left)."""
    try:
        prompt, completion = _records().example_ids(record, header, tokenizer, token_map)
    except ValueError as err:  # e.g. a chat file and a tokenizer without a chat template
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"data.generated_file line {record.line}: the student's tokenizer cannot encode "
            f"this prompt ({err}); use the teacher's tokenizer (data.tokenizer)"
        ) from None
    eos = tokenizer.eos_token_id
    if record.finish_reason == "stop" and eos is not None and completion[-1:] != [eos]:
        completion = [*completion, eos]  # the teacher stopped here: learn to stop
    if not prompt:
        return None, "dropped_no_prompt"  # no position predicts the first completion token
    ids = (prompt + completion)[:max_length]
    if len(ids) <= len(prompt):
        return None, "dropped_no_target"  # the prompt fills max_length
    example: dict[str, Any] = {"input_ids": ids, "prompt_length": len(prompt)}
    if token_map is not None and k is not None:
        example["topk"] = _records().completion_topk(record, token_map, k)  # (C, k), (C, k), (C,)
    return example, "examples"


def load_generated(
    path: str,
    tokenizer: Any,
    *,
    use_topk: bool,
    max_length: int,
    eval_fraction: float,
    seed: int,
    max_prompts: int | None = None,
) -> GeneratedData:
    """Read a generated file into train / held-out examples for ``tokenizer``.

    Prompts (with all their samples) are shuffled with ``seed``; the first ``max_prompts``
    are kept and ``eval_fraction`` of them (at least one) held out. ``use_topk``: attach
    each completion's top-k rows (the file must have them; the student's tokenizer must be
    the teacher's). Examples are cut to ``max_length`` tokens; one with no completion
    token left, or no prompt token, is dropped and counted in ``info``.
    """
    if isinstance(tokenizer, ByteTokenizer):
        raise ConfigError(
            "data.tokenizer: byte cannot read the prompts of a generated file (chat "
            "templates, the teacher's tokens); give a Hugging Face tokenizer folder — the "
            "teacher's, to use its top-k log-probabilities"
        )
    header, records = _records().read_generated(path)
    k = _file_k(header, records, path) if use_topk else None
    token_map = token_map_for(tokenizer) if use_topk else None
    prompts = sorted({r.prompt_index for r in records})
    random.Random(seed).shuffle(prompts)
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    n_eval = max(1, round(len(prompts) * eval_fraction))
    if len(prompts) - n_eval < 1:
        raise ConfigError(
            f"data.generated_file: {path} answers {len(prompts)} prompt(s); need at least 2 "
            "(one to train on, one held out)"
        )
    held_out, kept = set(prompts[:n_eval]), set(prompts)
    counts = dict.fromkeys(("examples", "dropped_no_prompt", "dropped_no_target"), 0)
    train, evaluation = [], []
    for record in records:
        if record.prompt_index not in kept:
            continue
        example, outcome = _example(record, header, tokenizer, token_map, k, max_length)
        counts[outcome] += 1
        if example is not None:
            (evaluation if record.prompt_index in held_out else train).append(example)
    if not train or not evaluation:
        raise ConfigError(
            f"data.generated_file: no usable {'training' if not train else 'held-out'} "
            f"example in {path} ({counts}); raise data.max_length"
        )
    info = {
        "file": str(path),
        "endpoint": header.get("endpoint"),
        "model": header.get("settings", {}).get("model"),
        "api": header.get("settings", {}).get("api"),
        "prompts": len(prompts),
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "topk": k,
        **counts,
    }
    return GeneratedData(train, evaluation, k, info)


def pack_example_rows(examples: Sequence[dict[str, Any]], width: int, k: int) -> Tensor:
    """The packed top-k teacher ``(B, width, 2k + 1)`` of a batch of generated examples.

    Row ``P − 1 + j`` of an example holds completion token ``j``'s teacher row, for the
    completion tokens left after truncation; every other row is :data:`NO_ROW`.
    """
    batch = len(examples)
    fill = -math.log(k + 1)  # finite placeholders; NO_ROW marks them
    values = torch.full((batch, width, k), fill)  # (B, T, k)
    indices = torch.full((batch, width, k), NO_ROW, dtype=torch.long)  # (B, T, k)
    rest = torch.full((batch, width), fill)  # (B, T)
    for b, example in enumerate(examples):
        v, i, r = example["topk"]  # (C, k), (C, k), (C,)
        prompt = int(example["prompt_length"])
        start = prompt - 1
        n = max(0, min(v.shape[0], len(example["input_ids"]) - prompt, width - start - 1))
        values[b, start : start + n] = v[:n]
        indices[b, start : start + n] = i[:n]
        rest[b, start : start + n] = r[:n]
    return pack_topk(values, indices, rest)  # (B, T, 2k + 1)


@dataclass
class GeneratedTopKCollator:
    """Collate generated examples and attach their packed top-k rows (``teacher.topk``)."""

    collate: CausalLMCollator
    k: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        width = batch["inputs"]["input_ids"].shape[1]
        batch[TEACHER_PREFIX + TOPK] = pack_example_rows(examples, width, self.k)
        return batch


class CoveredTopKTokenKDLoss(TopKTokenKDLoss):
    """:class:`~kdistill.lm.topk.TopKTokenKDLoss` over the positions that have a teacher row.

    A position whose packed row starts with the id :data:`NO_ROW` (no teacher distribution:
    the EOS appended to a completion) counts for no token; the mean is over the others.
    ``forward(student_logits (B, T, V), packed (B, T', 2k + 1), labels (B, T), mask)``.
    """

    def forward(
        self, student_logits: Tensor, packed: Tensor, labels: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        packed = packed[:, : student_logits.shape[1]]
        k = (packed.shape[-1] - 1) // 2
        missing = packed[..., k] < 0  # (B, T): no teacher row
        labels = labels.masked_fill(missing, IGNORE_INDEX)
        if bool(missing.any()):
            packed = packed.clone()
            ids = packed[..., k : 2 * k]  # (B, T, k), a view
            ids[missing] = torch.arange(k, dtype=packed.dtype, device=packed.device)
        return super().forward(student_logits, packed, labels, mask)
