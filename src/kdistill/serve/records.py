"""Training examples from a ``kdistill generate`` file, and their top-k teacher rows.

:func:`read_generated` reads the header and every completion record (sorted by prompt,
then sample; a torn last line — a run still writing or killed — is ignored, not cut).
:func:`example_ids` turns one record into the student's ``prompt_ids`` and
``completion_ids``: the prompt through the student tokenizer (chat records through its chat
template, with the header's ``system_prompt`` prepended exactly as ``generate`` sent it), the
completion as the *teacher's own tokens* mapped to the student's ids when the record has
them (so the top-k rows line up with the tokens they were computed for), else the
completion text tokenised.

:func:`completion_topk` maps each completion token's top-k alternatives to student ids
(:class:`~kdistill.serve.tokens.TokenMap`) and returns them in the layout of the on-disk
teacher cache (:mod:`kdistill.cache`): ``values (C, k)`` log-probabilities, ``indices
(C, k)``, ``rest_log_mass (C,)`` = ``log(1 − Σ top-k)``. :func:`sequence_topk` places them
on a whole training sequence ``prompt + completion`` of length ``L`` — the row of position
``P − 1 + j`` is the distribution predicting completion token ``j`` (causal-LM logits at a
position predict the *next* token) — and packs them with :func:`kdistill.lm.train.pack_topk`
into ``(L, 2k + 1)``; rows outside the completion are placeholders that the labels (``-100``
on prompt and padding) exclude.

Different tokenizers are an error (:class:`~kdistill.config.ConfigError`), never a skip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from kdistill.config import ConfigError
from kdistill.serve.client import TokenLogprob, TopToken
from kdistill.serve.scoring import placeholder_rows, topk_row
from kdistill.serve.tokens import AMBIGUOUS, TokenizerMismatch, TokenMap

__all__ = [
    "GeneratedExample",
    "completion_topk",
    "example_ids",
    "prompt_messages",
    "read_generated",
    "sequence_topk",
]


@dataclass(frozen=True)
class GeneratedExample:
    """One (prompt, sample) record of a generated file."""

    prompt_index: int
    sample_index: int
    prompt: str | None
    messages: list[dict[str, str]] | None
    completion: str
    finish_reason: str | None
    tokens: list[TokenLogprob] | None  # None: the server sent no log-probabilities
    line: int

    @property
    def has_topk(self) -> bool:
        return self.tokens is not None and all(t.top for t in self.tokens)


def _tokens(raw: Any) -> list[TokenLogprob] | None:
    if raw is None:
        return None
    return [
        TokenLogprob(
            token=t["token"],
            logprob=t.get("logprob"),
            bytes=t.get("bytes"),
            id=t.get("id"),
            top=tuple(
                TopToken(e["token"], float(e["logprob"]), e.get("bytes"), e.get("id"))
                for e in t.get("top_logprobs") or []
            ),
        )
        for t in raw
    ]


def read_generated(path: str | Path) -> tuple[dict[str, Any], list[GeneratedExample]]:
    """The header and the records of a generated file, by (prompt_index, sample_index)."""
    from kdistill.serve.generate import FORMAT

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.generated_file: {path} does not exist; run kdistill generate")
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # a torn last line is ignored
    header: dict[str, Any] | None = None
    examples: dict[tuple[int, int], GeneratedExample] = {}
    for line_no, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data.generated_file: {path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
        if line_no == 1:
            if record.get("kind") != "header" or record.get("format") != FORMAT:
                raise ConfigError(f"{where}: not a kdistill generate file (no header)")
            header = record
            continue
        if record.get("kind") != "completion":
            continue
        try:
            key = (int(record["prompt_index"]), int(record["sample_index"]))
            example = GeneratedExample(
                prompt_index=key[0],
                sample_index=key[1],
                prompt=record.get("prompt"),
                messages=record.get("messages"),
                completion=str(record["completion"]),
                finish_reason=record.get("finish_reason"),
                tokens=_tokens(record.get("tokens")),
                line=line_no,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: malformed completion record ({err!r})") from None
        if key in examples:
            raise ConfigError(f"{where}: prompt {key[0]} sample {key[1]} appears twice")
        examples[key] = example
    if header is None:
        raise ConfigError(f"data.generated_file: {path} is empty")
    if not examples:
        raise ConfigError(f"data.generated_file: {path} holds no completions yet")
    return header, [examples[key] for key in sorted(examples)]


def prompt_messages(example: GeneratedExample, header: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages ``generate`` sent for a record (system prompt included)."""
    messages = (
        [dict(m) for m in example.messages]
        if example.messages is not None
        else [{"role": "user", "content": example.prompt or ""}]
    )
    system = header.get("settings", {}).get("system_prompt")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _map_error(example: GeneratedExample, err: Exception) -> ConfigError:
    return ConfigError(
        f"data.generated_file line {example.line}: {err}; the teacher's and the student's "
        "tokenizers differ, so the file's top-k log-probabilities cannot be used here (give "
        "the student the teacher's tokenizer, or train without them: sequence-level KD)"
    )


def example_ids(
    example: GeneratedExample,
    header: Mapping[str, Any],
    tokenizer: Any,
    token_map: TokenMap | None = None,
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` in the student's vocabulary (see the module doc)."""
    chat = header.get("settings", {}).get("api") == "chat"
    if chat:
        text = tokenizer.apply_chat_template(
            prompt_messages(example, header), tokenize=False, add_generation_prompt=True
        )
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = list(tokenizer(example.prompt or "", add_special_tokens=True)["input_ids"])
    if example.tokens is not None and token_map is not None:
        try:
            completion = [token_map.lookup(t.token, t.bytes, t.id) for t in example.tokens]
        except TokenizerMismatch as err:
            raise _map_error(example, err) from None
        if AMBIGUOUS in completion:
            raise _map_error(example, ValueError("a completion token's text matches several ids"))
    else:
        completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    return prompt_ids, completion


def completion_topk(
    example: GeneratedExample, token_map: TokenMap, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``values (C, k)``, ``indices (C, k)`` int64, ``rest_log_mass (C,)`` of the ``C``
    completion tokens (row ``j`` = the teacher's distribution that produced token ``j``)."""
    if not example.has_topk:
        raise ConfigError(
            f"data.generated_file line {example.line}: no top-k log-probabilities in this "
            "record; generate with sampling.logprobs: k > 0, or train by sequence-level KD only"
        )
    assert example.tokens is not None
    rows = len(example.tokens)
    values, indices, rest = placeholder_rows(rows, k)
    try:
        for j, token in enumerate(example.tokens):
            values[j], indices[j], rest[j], _ = topk_row(token.top, k, token_map)
    except TokenizerMismatch as err:
        raise _map_error(example, err) from None
    return values, indices, rest


def sequence_topk(
    prompt_length: int,
    completion: tuple[Tensor, Tensor, Tensor],
    length: int,
) -> Tensor:
    """Packed top-k ``(length, 2k + 1)`` for ``prompt (P) + completion (C)`` tokens.

    Row ``P − 1 + j`` holds completion token ``j``'s row (``j < C``, rows past ``length``
    dropped: a truncated sequence); every other row is a placeholder. ``P ≥ 1``.
    """
    try:
        from kdistill.lm.topk import pack_topk
    except ImportError:  # older layout
        from kdistill.lm.train import pack_topk

    if prompt_length < 1:
        raise ValueError("the prompt must have at least one token (row P − 1 must exist)")
    values, indices, rest = completion
    k = values.shape[-1]
    full_v, full_i, full_r = placeholder_rows(length, k)
    start = prompt_length - 1
    count = max(0, min(values.shape[0], length - start))
    full_v[start : start + count] = values[:count]
    full_i[start : start + count] = indices[:count]
    full_r[start : start + count] = rest[:count]
    return pack_topk(full_v, full_i, full_r)  # (length, 2k + 1)
