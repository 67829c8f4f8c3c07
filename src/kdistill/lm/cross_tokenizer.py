"""Cross-tokenizer distillation: the plumbing around :mod:`kdistill.lm.alignment` and
:mod:`kdistill.lm.uld`.

* :class:`CrossTokenizerCollator` — raw texts → the student's causal-LM batch, the
  teacher's inputs and the alignment tensors the losses take.
* :func:`vocab_map` — which student and teacher tokens stand for the same bytes (the
  matched set of the hybrid loss).
* Teacher distributions: a live teacher's logits ``(B, T_t, V_t)``, or :class:`TopKTeacher`
  for an on-disk top-k cache (ids in the teacher's vocabulary, indexed by teacher position;
  the cache also stores :func:`~kdistill.lm.alignment.teacher_alignment_record`) and for a
  served teacher's ``top_logprobs`` mapped onto the student's side by
  :func:`served_teacher_topk`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdistill.config import ConfigError
from kdistill.lm.alignment import (
    AlignmentError,
    SpanTokenizer,
    TokenSpans,
    align_spans,
    alignment_tensors,
    spans_from_pieces,
)
from kdistill.lm.batches import IGNORE_INDEX, causal_lm_labels, pad_right

__all__ = [
    "CrossTokenizerCollator",
    "Teacher",
    "TopKTeacher",
    "VocabMap",
    "served_teacher_topk",
    "tokenize_spans",
    "vocab_map",
    "vocab_map_from_keys",
]


# --------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher known on ``k`` tokens per position.

    ``log_probs`` ``(B, T_t, k)`` float (``-inf`` = no entry), ``ids`` ``(B, T_t, k)`` int
    (``-1`` = no entry) into a vocabulary of ``vocab_size`` ids. A position with no entry has
    no distribution and must not be compared.
    """

    log_probs: Tensor
    ids: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.log_probs.shape != self.ids.shape or self.ids.dim() != 3:
            raise ValueError(
                f"TopKTeacher needs log_probs and ids of one shape (B, T, k); got "
                f"{tuple(self.log_probs.shape)} and {tuple(self.ids.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.ids.shape[:2], self.vocab_size))

    def rows(self, flat_rows: Tensor) -> Tensor:
        """Dense logits ``(n, vocab_size)`` (``-inf`` off the top-k) of flat positions."""
        k = self.ids.shape[-1]
        ids = self.ids.reshape(-1, k).index_select(0, flat_rows)  # (n, k)
        values = self.log_probs.reshape(-1, k).index_select(0, flat_rows)
        present = ids >= 0
        if not bool(present.any(dim=-1).all()):
            raise ValueError(
                "a compared teacher position has no top-k entry (no distribution there); mask "
                "it out of the alignment"
            )
        dense = values.new_full((ids.shape[0], self.vocab_size + 1), -math.inf)
        slot = torch.where(present, ids.long(), self.vocab_size)  # absent entries → a spare column
        dense.scatter_(1, slot, torch.where(present, values, -math.inf))
        return dense[:, : self.vocab_size]


Teacher = Tensor | TopKTeacher


# --------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class VocabMap:
    """Matched tokens: ``student_ids[i]`` and ``teacher_ids[i]`` mean the same text."""

    student_ids: Tensor  # (M,) int64
    teacher_ids: Tensor  # (M,) int64
    student_vocab: int
    teacher_vocab: int

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    @property
    def is_identity(self) -> bool:
        n = self.student_vocab
        return (
            self.teacher_vocab == n
            and self.size == n
            and bool((self.student_ids == torch.arange(n)).all())
            and bool((self.teacher_ids == torch.arange(n)).all())
        )

    def unmatched(self, side: str) -> Tensor:
        vocab, ids = (
            (self.student_vocab, self.student_ids)
            if side == "student"
            else (self.teacher_vocab, self.teacher_ids)
        )
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[ids] = False
        return keep.nonzero().squeeze(1)

    @classmethod
    def shared_prefix(cls, student_vocab: int, teacher_vocab: int) -> VocabMap:
        """The teacher's first ``student_vocab`` ids are the student's (served teachers)."""
        ids = torch.arange(student_vocab)
        return cls(ids, ids.clone(), student_vocab, teacher_vocab)


def vocab_map_from_keys(
    student_keys: Sequence[bytes | str], teacher_keys: Sequence[bytes | str]
) -> VocabMap:
    """Match ids whose keys are equal; the ``i``-th student id of a key with its ``i``-th
    teacher id (so two identical vocabularies map id ``v`` to id ``v``)."""
    pending: dict[bytes | str, list[int]] = {}
    for i, key in enumerate(student_keys):
        pending.setdefault(key, []).append(i)
    for ids in pending.values():
        ids.reverse()  # pop() takes the lowest id first
    pairs = []
    for j, key in enumerate(teacher_keys):
        waiting = pending.get(key)
        if waiting:
            pairs.append((waiting.pop(), j))
    s = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    t = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return VocabMap(s, t, len(student_keys), len(teacher_keys))


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """Tokens of the two tokenizers that stand for the same bytes.

    Byte-level ``Ġthe``, SentencePiece ``▁the`` and ByteTokenizer-style tokens are compared
    by their bytes (so a Llama-3 and a Llama-2 token for ``" the"`` match, which GOLD's
    string comparison misses); special tokens and WordPiece tokens by their strings.
    """
    s = SpanTokenizer(student_tokenizer, "student tokenizer")
    t = SpanTokenizer(teacher_tokenizer, "teacher tokenizer")
    return vocab_map_from_keys(s.vocab_keys(), t.vocab_keys())


# --------------------------------------------------------------------------- served teachers


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _record_bytes(record: Any) -> bytes:
    raw = _field(record, "bytes")
    if raw is not None:
        return bytes(raw)
    token = _field(record, "token")
    if not isinstance(token, str):
        raise AlignmentError(f"a logprobs record has no 'token' string: {record!r}")
    return token.encode("utf-8")


def _logaddexp(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def _top_of(record: Any) -> Sequence[Any]:
    top = _field(record, "top_logprobs")
    if top is None:
        top = _field(record, "top")
    return top or ()


def served_teacher_topk(
    student: Sequence[TokenSpans],
    records: Sequence[Sequence[Any]],
    student_tokenizer: Any,
    texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Map a served teacher's ``top_logprobs`` onto the student's side of the alignment.

    ``records[b]`` is the per-token log-probability list the OpenAI-compatible server gave
    for text ``b`` scored as a whole (``logprobs.content`` of a chat response, or
    :class:`kdistill.serve.client.TokenLogprob` objects): token ``i`` with its ``token``
    string, optional ``bytes`` and ``top_logprobs`` ``[{"token", "logprob", "bytes"}]``,
    the teacher's distribution of token ``i`` given tokens ``< i``. So teacher *position*
    ``j`` is "after ``j`` tokens": position 0 (zero-width, before the first token) holds
    token 0's alternatives, position ``j`` token ``j``'s, the last position none (masked).

    Alternatives are mapped by their bytes onto student ids (alternatives with the same bytes
    are one text, their probabilities added); those no student token spells get ids
    ``V_s, V_s + 1, …`` (shared by the batch). The result feeds
    :func:`uld_divergence` (which needs only the sorted probabilities) and
    :func:`hybrid_divergence` with ``VocabMap.shared_prefix(V_s, vocab_size)``.

    Args:
        student: the student's :class:`~kdistill.lm.alignment.TokenSpans` of each text.
        records: per text, the teacher's token records.
        student_tokenizer: gives the student's token bytes (vocab keys).
        texts: when given, the teacher's tokens must spell each text byte for byte.

    Returns:
        ``{"teacher": TopKTeacher (B, n + 1, k), "alignment": {...}, "vocab": VocabMap}``.

    Raises:
        AlignmentError: the records do not spell the text.
    """
    if len(student) != len(records):
        raise ValueError(f"{len(student)} student texts but {len(records)} teacher record lists")
    wrapped = SpanTokenizer(student_tokenizer, "student tokenizer")
    key_to_id: dict[bytes | str, int] = {}
    for i, key in enumerate(wrapped.vocab_keys()):
        key_to_id.setdefault(key, i)
    v_s = wrapped.vocab_size
    extra: dict[bytes, int] = {}
    groups, rows = [], []
    for b, (spans, recs) in enumerate(zip(student, records, strict=True)):
        pieces = [_record_bytes(r) for r in recs]
        data = b"".join(pieces)
        text = None if texts is None else texts[b].encode("utf-8")
        if text is not None and data == b" " + text and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # SentencePiece's dummy-prefix "▁" is not text
            data = text
        if text is not None and data != text:
            raise AlignmentError(
                f"text {b}: the served teacher's tokens spell {data[:60]!r}… but the text is "
                f"{texts[b][:60]!r}…; score the text itself (echo / prompt_logprobs)"
            )
        teacher_spans = [(0, 0), *spans_from_pieces(pieces)]  # position j = after j tokens
        groups.append(align_spans(spans.spans, teacher_spans))
        row = []
        for j in range(len(teacher_spans)):
            alternatives: dict[int, float] = {}  # alternatives with the same bytes add up
            for alt in _top_of(recs[j]) if j < len(recs) else ():
                key = _record_bytes(alt)
                token_id = key_to_id.get(key)
                if token_id is None:
                    token_id = extra.setdefault(key, v_s + len(extra))
                lp = float(_field(alt, "logprob"))
                old = alternatives.get(token_id)
                alternatives[token_id] = lp if old is None else float(_logaddexp(old, lp))
            row.append(list(alternatives.items()))
        rows.append(row)
    width = max(len(r) for r in rows)
    k = max((len(a) for r in rows for a in r), default=1) or 1
    ids = torch.full((len(rows), width, k), -1, dtype=torch.long)
    log_probs = torch.full((len(rows), width, k), -math.inf)
    for b, row in enumerate(rows):
        for j, alternatives in enumerate(row):
            for slot, (token_id, lp) in enumerate(alternatives):
                ids[b, j, slot], log_probs[b, j, slot] = token_id, lp
    alignment = alignment_tensors(groups)
    has_entry = (ids >= 0).any(dim=-1)  # (B, width)
    alignment["mask"] &= has_entry.gather(1, alignment["teacher_positions"])
    teacher = TopKTeacher(log_probs, ids, v_s + len(extra))
    return {
        "teacher": teacher,
        "alignment": alignment,
        "vocab": VocabMap.shared_prefix(v_s, teacher.vocab_size),
    }


# --------------------------------------------------------------------------- collator


def _text_of(example: Any, i: int) -> str:
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping) and isinstance(example.get("text"), str):
        return example["text"]
    raise ConfigError(
        f"example {i}: CrossTokenizerCollator takes raw texts (str or {{'text': str}}), got "
        f"{type(example).__name__}; both tokenizers must see the text itself"
    )


@dataclass
class CrossTokenizerCollator:
    """Tokenise raw texts with the student's and the teacher's tokenizer and align them.

    Args:
        student_tokenizer, teacher_tokenizer: any tokenizers :class:`SpanTokenizer` takes.
        max_length: student tokens kept per text (``None`` = all).
        teacher_max_length: teacher tokens kept (``None`` = all).
        append_eos: append the student's EOS (as ``kdistill lm`` does, so it learns where a
            text ends); the teacher gets its own EOS when it has one. EOS is zero-width, so
            the last text byte closes a compared group when both sides have it.
        trim_teacher: also drop the teacher tokens that end past the last byte the student
            kept (after ``max_length``): no group can close there, so the teacher does not
            read text the student never sees. The groups are the same as without it.

    ``collator(texts)`` → the batch of :class:`~kdistill.lm.batches.CausalLMCollator`
    (``{"inputs": {"input_ids", "attention_mask"}, "target": labels, "prompt_lengths"}``)
    plus ``"teacher_inputs": {"input_ids", "attention_mask"}`` (right-padded with the
    teacher's pad id), ``"alignment": {"student_positions", "teacher_positions", "mask"}``
    (:func:`alignment_tensors`; ``mask`` also requires the student's label there to count)
    and ``"num_bytes"`` ``(B,)``, the UTF-8 bytes of each text.
    """

    student_tokenizer: Any
    teacher_tokenizer: Any
    max_length: int | None = None
    teacher_max_length: int | None = None
    append_eos: bool = False
    trim_teacher: bool = False
    student: SpanTokenizer = field(init=False, repr=False)
    teacher: SpanTokenizer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("max_length", "teacher_max_length"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ConfigError(f"{key} must be >= 2 tokens or None, got {value}")
        self.student = SpanTokenizer(self.student_tokenizer, "student tokenizer")
        self.teacher = SpanTokenizer(self.teacher_tokenizer, "teacher tokenizer")
        for side in (self.student, self.teacher):
            if _pad_id(side) is None:
                raise ConfigError(
                    f"the {side.name} has neither a pad nor an EOS token; set tokenizer.pad_token"
                )

    def _tokenize(self, side: SpanTokenizer, text: str, length: int | None) -> TokenSpans:
        return tokenize_spans(side, text, length, append_eos=self.append_eos)

    def tokens(self, text: str) -> tuple[TokenSpans, TokenSpans]:
        """The student's and the teacher's tokens of ``text``, as a batch holds them (a
        teacher cache built on the teacher's ids lines up with the batches' positions)."""
        student = self._tokenize(self.student, text, self.max_length)
        teacher = self._tokenize(self.teacher, text, self.teacher_max_length)
        if self.trim_teacher:
            teacher = _within(teacher, max((e for _, e in student.spans), default=0))
        return student, teacher

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of texts")
        texts = [_text_of(x, i) for i, x in enumerate(examples)]
        pairs = [self.tokens(t) for t in texts]
        student, teacher = [s for s, _ in pairs], [t for _, t in pairs]
        groups = [align_spans(s.spans, t.spans) for s, t in zip(student, teacher, strict=True)]
        s_ids, s_mask = pad_right([s.input_ids for s in student], _pad_id(self.student))
        t_ids, t_mask = pad_right([t.input_ids for t in teacher], _pad_id(self.teacher))
        labels = causal_lm_labels(s_ids, s_mask)  # (B, Ts)
        alignment = alignment_tensors(groups)
        counted = labels.gather(1, alignment["student_positions"]) != IGNORE_INDEX  # (B, G)
        alignment["mask"] &= counted
        return {
            "inputs": {"input_ids": s_ids, "attention_mask": s_mask},
            "target": labels,
            "prompt_lengths": torch.zeros(len(texts), dtype=torch.long),
            "teacher_inputs": {"input_ids": t_ids, "attention_mask": t_mask},
            "alignment": alignment,
            "num_bytes": torch.tensor([s.num_bytes for s in student], dtype=torch.long),
        }


def tokenize_spans(
    side: SpanTokenizer, text: str, max_length: int | None, append_eos: bool
) -> TokenSpans:
    """``text``'s tokens with their byte spans, as ``kdistill lm`` trains on them: the EOS
    appended (zero-width, at the last byte) when ``append_eos`` and the tokenizer has one,
    then cut to ``max_length`` tokens (``None`` = all)."""
    spans = side.tokenize(text)
    eos = getattr(side.tokenizer, "eos_token_id", None)
    if append_eos and eos is not None and spans.input_ids[-1:] != [eos]:
        end = spans.spans[-1][1] if spans.spans else 0
        spans = TokenSpans([*spans.input_ids, eos], [*spans.spans, (end, end)], spans.num_bytes)
    return spans.truncate(max_length)


def _within(spans: TokenSpans, end: int) -> TokenSpans:
    """The leading tokens of ``spans`` that end at or before byte ``end`` (at least one)."""
    keep = 0
    while keep < len(spans.spans) and spans.spans[keep][1] <= end:
        keep += 1
    return spans.truncate(max(keep, 1))


def _pad_id(side: SpanTokenizer) -> int | None:
    tok = side.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    return pad if pad is not None else getattr(tok, "eos_token_id", None)
