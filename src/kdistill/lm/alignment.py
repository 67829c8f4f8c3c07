"""Aligning two tokenisations of one text by their UTF-8 byte spans.

A teacher and a student with different tokenizers cut the same text into different tokens.
Their next-token distributions can only be compared where both models have read *exactly
the same text*: after a token of each that ends at the same byte. This module finds those
places.

**Byte spans.** :class:`SpanTokenizer` wraps a tokenizer and gives every token the UTF-8
byte span ``[start, end)`` of the text it stands for; special tokens (BOS, EOS, ``[CLS]``)
are zero-width (``start == end``). The bytes come from the tokens themselves where the
tokenizer is lossless, and are checked to spell the text exactly:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of a token string is one
  byte through GPT-2's ``bytes_to_unicode`` table (``Ġ`` = space), so a token may hold
  part of a multi-byte character (an emoji split over three tokens has exact spans);
* SentencePiece-style (``▁`` = space, ``<0x0A>`` byte-fallback pieces), with the
  ``▁`` that the tokenizer itself puts before the first word removed;
* :class:`~kdistill.lm.batches.ByteTokenizer`: ids ``0 … 255`` are the bytes;
* other fast tokenizers (WordPiece): the character offsets of ``return_offsets_mapping``,
  turned into byte offsets, each token checked to spell its slice of the text (``##``
  continuation prefix removed); whitespace between tokens belongs to the next token.

A tokenizer whose normaliser changes the text (lower-casing or accent-stripping WordPiece,
NFKC) or that maps text to an unknown token makes tokens that do not spell the text; that
raises :class:`AlignmentError` naming the tokenizer, the text and the token, never a wrong
alignment.

**Groups.** :func:`align_spans` walks both span lists and closes a group where both sides
have a token ending at the same byte (TRL's GOLD trainer, ``_align_by_byte_offsets``, does
the same walk). Group ``g`` holds student tokens ``[s0, s1)`` and teacher tokens
``[t0, t1)`` that cover the same bytes ``[b0, b1)``. The last token of each side,
``s1 − 1`` and ``t1 − 1``, is where both models have read the text ``[0, b1)`` and no more:
their next-token distributions are the ones compared by the cross-tokenizer losses
(:mod:`kdistill.lm.uld`). A group is *compared* only when the student has a next token.
Tokens inside a group, where the two models have read different amounts of text, are not
compared.

**Batches.** :func:`alignment_tensors` turns the groups of a batch into
``student_positions``, ``teacher_positions`` ``(B, G)`` and a ``mask`` ``(B, G)``;
:class:`kdistill.lm.cross_tokenizer.CrossTokenizerCollator` tokenises raw texts with both tokenizers and returns the
student batch of :class:`~kdistill.lm.batches.CausalLMCollator`, the teacher's inputs and
these tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdistill.config import ConfigError
from kdistill.lm.batches import ByteTokenizer

__all__ = [
    "AlignedGroup",
    "AlignmentError",
    "SpanTokenizer",
    "TokenSpans",
    "align_spans",
    "alignment_tensors",
    "spans_from_pieces",
    "teacher_alignment_record",
    "tokenizer_identity",
]

Span = tuple[int, int]
"""A UTF-8 byte range ``[start, end)`` of the text."""


class AlignmentError(ConfigError):
    """Two tokenisations of a text cannot be aligned; the message names tokenizer and text."""


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --------------------------------------------------------------------------- byte tables


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()
_METASPACE = "▁"


def _json_types(component: Any) -> list[dict[str, Any]]:
    """The JSON of a ``tokenizers`` component and, for a ``Sequence``, of its parts."""
    if component is None:
        return []
    try:
        state = json.loads(component.__getstate__())
    except Exception:  # pragma: no cover - components without a JSON state
        return [{"type": type(component).__name__}]
    parts = [state]
    for key in ("decoders", "pretokenizers", "normalizers"):
        parts.extend(state.get(key) or [])
    return parts


# --------------------------------------------------------------------------- tokenizer wrapper


@dataclass(frozen=True)
class TokenSpans:
    """One text tokenised: ids and the byte span of each token (specials zero-width)."""

    input_ids: list[int]
    spans: list[Span]
    num_bytes: int  # UTF-8 bytes of the whole text (before any truncation)

    def truncate(self, length: int | None) -> TokenSpans:
        if length is None or length >= len(self.input_ids):
            return self
        return TokenSpans(self.input_ids[:length], self.spans[:length], self.num_bytes)


class SpanTokenizer:
    """A tokenizer that also tells which UTF-8 bytes of the text each token stands for.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow) or
            :class:`~kdistill.lm.batches.ByteTokenizer`.
        name: how errors name it (``"teacher tokenizer"``, a path, ...).

    Attributes:
        scheme: ``"bytes"`` (ByteTokenizer), ``"byte_level"`` (GPT-2 alphabet),
            ``"metaspace"`` (SentencePiece ``▁``), ``"offsets"`` (fast tokenizer offsets,
            e.g. WordPiece) or ``"decode"`` (a slow tokenizer: each token decoded alone).
    """

    def __init__(self, tokenizer: Any, name: str = "tokenizer") -> None:
        if isinstance(tokenizer, SpanTokenizer):
            tokenizer = tokenizer.tokenizer
        self.tokenizer = tokenizer
        self.name = name
        self.special_ids = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        self._added: dict[int, Any] = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.byte_fallback = False
        self.wordpiece_prefix = "##"
        self.scheme = self._detect()

    def __repr__(self) -> str:
        return f"SpanTokenizer({self.name!r}, scheme={self.scheme!r})"

    @property
    def vocab_size(self) -> int:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.vocab_size
        return len(self.tokenizer)

    def _detect(self) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return "bytes"
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return "decode"
        model = backend.model
        self.byte_fallback = bool(getattr(model, "byte_fallback", False))
        kinds = [c.get("type") for c in _json_types(backend.decoder)]
        kinds += [c.get("type") for c in _json_types(backend.pre_tokenizer)]
        if type(model).__name__ == "WordPiece":
            self.wordpiece_prefix = getattr(model, "continuing_subword_prefix", "##") or ""
            return "offsets"
        if "ByteLevel" in kinds:
            return "byte_level"
        replaces = [
            c
            for c in _json_types(backend.decoder)
            if c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == _METASPACE
        ]
        if "Metaspace" in kinds or replaces:
            return "metaspace"
        return "offsets"

    # -- one token ---------------------------------------------------------------------

    def _is_special(self, token_id: int) -> bool:
        if token_id in self.special_ids:
            return True
        added = self._added.get(token_id)
        return bool(added is not None and getattr(added, "special", False))

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes token ``token_id`` stands for; ``None`` for a special (zero-width) token.

        For the ``"offsets"`` scheme this is the token's own spelling (``##`` removed), for
        checking, not necessarily its text (a normaliser may have changed it).
        """
        token_id = int(token_id)
        if self._is_special(token_id):
            return None
        if self.scheme == "bytes":
            return bytes([token_id]) if 0 <= token_id < 256 else None
        added = self._added.get(token_id)
        if added is not None:  # a non-special added token is literal text
            return str(added).encode("utf-8")
        if self.scheme == "decode":
            return self.tokenizer.decode([token_id]).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            raise AlignmentError(f"{self.name}: id {token_id} is not in its vocabulary")
        if self.scheme == "byte_level":
            try:
                return bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError as err:
                raise AlignmentError(
                    f"{self.name}: token {piece!r} (id {token_id}) has a character outside the "
                    "byte-level alphabet; it is not a byte-level BPE tokenizer"
                ) from err
        if self.scheme == "metaspace":
            if self.byte_fallback and len(piece) == 6 and piece.startswith("<0x"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace(_METASPACE, " ").encode("utf-8")
        prefix = self.wordpiece_prefix
        if prefix and piece.startswith(prefix):
            piece = piece[len(prefix) :]
        return piece.encode("utf-8")

    def vocab_keys(self) -> list[bytes | str]:
        """Per id, what the token means across tokenizers: its bytes, or for specials and
        WordPiece tokens (whose bytes are not the text's) a string tagged by the scheme."""
        keys: list[bytes | str] = []
        for i in range(self.vocab_size):
            piece = self.token_bytes(i)
            if piece is None or self.scheme in ("offsets", "decode"):
                raw = (
                    self.tokenizer.convert_ids_to_tokens(i)
                    if hasattr(self.tokenizer, "convert_ids_to_tokens")
                    else f"<special {i}>"
                )
                keys.append(f"{'special' if piece is None else self.scheme}:{raw}")
            else:
                keys.append(piece)
        return keys

    def fingerprint(self) -> str:
        """SHA-256 of what defines the tokenisation (its ``tokenizer.json``, or the vocab)."""
        digest = hashlib.sha256()
        digest.update(self.scheme.encode())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            digest.update(backend.to_str().encode("utf-8"))
        elif isinstance(self.tokenizer, ByteTokenizer):
            digest.update(b"kdistill.ByteTokenizer/260")
        else:
            vocab = self.tokenizer.get_vocab()
            digest.update(json.dumps(sorted(vocab.items())).encode("utf-8"))
        return digest.hexdigest()

    # -- whole texts -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize(
        self, text: str, add_special_tokens: bool = True, max_length: int | None = None
    ) -> TokenSpans:
        """Token ids of ``text`` with their byte spans (truncated to ``max_length`` tokens).

        Raises:
            AlignmentError: the tokens do not spell the text (a normaliser, an unknown
                token); the message names this tokenizer, the text and the token.
        """
        if self.scheme == "offsets":
            enc = self.tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            ids = list(enc["input_ids"])
            spans = self._spans_from_offsets(text, ids, list(enc["offset_mapping"]))
        else:
            ids = self.encode(text, add_special_tokens)
            spans = self.spans(text, ids)
        return TokenSpans(ids, spans, len(text.encode("utf-8"))).truncate(max_length)

    def spans(self, text: str, ids: Sequence[int]) -> list[Span]:
        """Byte spans of the tokens ``ids`` of ``text`` from the tokens' own bytes."""
        if self.scheme == "offsets":
            raise AlignmentError(
                f"{self.name} ({type(self.tokenizer).__name__}) needs its offsets: use "
                "tokenize(text) rather than spans(text, ids)"
            )
        pieces = [self.token_bytes(i) for i in ids]
        data = text.encode("utf-8")
        joined = b"".join(p for p in pieces if p is not None)
        if joined != data and self.scheme == "metaspace" and joined == b" " + data:
            first = next(i for i, p in enumerate(pieces) if p)
            if pieces[first].startswith(b" "):  # type: ignore[union-attr]
                pieces[first] = pieces[first][1:]  # type: ignore[index]  # the dummy-prefix ▁
                joined = data
        if joined != data:
            self._raise_mismatch(text, list(ids), pieces, joined, data)
        return spans_from_pieces(pieces)

    def _raise_mismatch(
        self,
        text: str,
        ids: list[int],
        pieces: list[bytes | None],
        joined: bytes,
        data: bytes,
    ) -> None:
        at = next((i for i in range(min(len(joined), len(data))) if joined[i] != data[i]), None)
        if at is None:
            at = min(len(joined), len(data))
        pos, culprit = 0, None
        for token_id, piece in zip(ids, pieces, strict=True):
            if piece and pos + len(piece) > at:
                culprit = (token_id, piece)
                break
            pos += len(piece or b"")
        where = (
            f"token id {culprit[0]} {culprit[1]!r} vs the text's {data[pos : pos + len(culprit[1])]!r}"
            if culprit
            else "the tokens end early (a special token in the text, or text dropped)"
        )
        raise AlignmentError(
            f"{self.name} ({type(self.tokenizer).__name__}, {self.scheme}) does not spell the text "
            f"{_snippet(text)} byte for byte: they differ at byte {at}: {where}. Its normaliser "
            "changes the text (lower-casing, accent stripping, unicode normalisation) or it has "
            "special tokens inside the text; cross-tokenizer alignment needs tokenizers whose "
            "tokens reproduce the text"
        )

    def _spans_from_offsets(
        self, text: str, ids: list[int], offsets: list[tuple[int, int]]
    ) -> list[Span]:
        starts = [0]  # byte offset of each character, and of the end
        for ch in text:
            starts.append(starts[-1] + len(ch.encode("utf-8")))
        spans: list[Span] = []
        pos = 0  # bytes covered so far
        for token_id, (c0, c1) in zip(ids, offsets, strict=True):
            piece = self.token_bytes(token_id)
            if piece is None and c0 == c1:
                spans.append((pos, pos))
                continue
            b0, b1 = starts[c0], starts[c1]
            gap = text.encode("utf-8")[pos:b0]
            raw = self.tokenizer.convert_ids_to_tokens(int(token_id))
            skips_text = bool(gap) and not gap.decode("utf-8", "replace").isspace()
            if b0 < pos or skips_text:
                raise AlignmentError(
                    f"{self.name} ({type(self.tokenizer).__name__}): token {raw!r} (id "
                    f"{token_id}) has offsets ({c0}, {c1}) that overlap the previous token or "
                    f"skip non-space text in {_snippet(text)}; it cannot be aligned by bytes"
                )
            actual = text.encode("utf-8")[b0:b1]
            if piece != actual:
                raise AlignmentError(
                    f"{self.name} ({type(self.tokenizer).__name__}): token {raw!r} (id "
                    f"{token_id}) stands for {actual.decode('utf-8', 'replace')!r} at characters "
                    f"{c0}-{c1} of the text {_snippet(text)}; its normaliser changes the text "
                    "(lower-casing, accent stripping) or the text has characters outside its "
                    "vocabulary, so its tokens cannot be aligned by bytes with another tokenizer"
                )
            spans.append((pos, b1))  # the whitespace before a token belongs to it
            pos = b1
        return spans


def spans_from_pieces(pieces: Sequence[bytes | None]) -> list[Span]:
    """Byte spans of consecutive tokens from their bytes (``None`` = zero-width special)."""
    spans, pos = [], 0
    for piece in pieces:
        end = pos + (len(piece) if piece else 0)
        spans.append((pos, end))
        pos = end
    return spans


# --------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class AlignedGroup:
    """Student tokens ``[student_start, student_stop)`` and teacher tokens
    ``[teacher_start, teacher_stop)`` that cover the same bytes ``[byte_start, byte_stop)``.

    ``compared``: the student has a token after the group (a target), so the next-token
    distributions at ``student_stop − 1`` and ``teacher_stop − 1`` are compared.
    """

    student_start: int
    student_stop: int
    teacher_start: int
    teacher_stop: int
    byte_start: int
    byte_stop: int
    compared: bool

    @property
    def student_position(self) -> int:
        return self.student_stop - 1

    @property
    def teacher_position(self) -> int:
        return self.teacher_stop - 1


def _last_index_by_end(spans: Sequence[Span], side: str) -> dict[int, int]:
    last: dict[int, int] = {}
    previous = 0
    for i, (start, end) in enumerate(spans):
        if start > end or end < previous or start < 0:
            raise AlignmentError(
                f"{side} byte spans must be contiguous and non-decreasing: token {i} has "
                f"{(start, end)} after a token ending at byte {previous}"
            )
        last[end] = i
        previous = end
    return last


def _text_stop(spans: Sequence[Span]) -> int:
    """Index after the last token with text: trailing zero-width tokens (EOS) are left out
    of the walk, so the last group closes at the last text token, which predicts the EOS."""
    stop = len(spans)
    while stop and spans[stop - 1][0] == spans[stop - 1][1]:
        stop -= 1
    return stop


def align_spans(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> list[AlignedGroup]:
    """Group student and teacher tokens until both sides end at the same byte.

    Args:
        student_spans, teacher_spans: per token ``(start, end)`` byte spans of one text
            (from :meth:`SpanTokenizer.tokenize`), non-decreasing; zero-width for specials.
            Either side may be truncated: groups stop where the shorter side stops.

    Returns:
        The groups in text order. A byte end shared by both sides closes a group at the
        *last* token of each side ending there (so a BOS at byte 0 of both sides is a group
        of its own, and a BOS on one side only joins the first group); trailing zero-width
        tokens (EOS) join no group. A group is ``compared`` when the student has a token
        after it (the teacher's logits exist at every one of its positions; a teacher
        without a distribution somewhere, e.g. a served one, masks it itself).
    """
    last_s = _last_index_by_end(student_spans[: _text_stop(student_spans)], "student")
    last_t = _last_index_by_end(teacher_spans[: _text_stop(teacher_spans)], "teacher")
    groups = []
    s0 = t0 = b0 = 0
    for end in sorted(last_s.keys() & last_t.keys()):
        s1, t1 = last_s[end] + 1, last_t[end] + 1
        compared = s1 < len(student_spans)  # the student has a next token to predict
        groups.append(AlignedGroup(s0, s1, t0, t1, b0, end, compared))
        s0, t0, b0 = s1, t1, end
    return groups


def alignment_tensors(
    groups: Sequence[Sequence[AlignedGroup]], width: int | None = None
) -> dict[str, Tensor]:
    """Batch the compared groups: ``student_positions``, ``teacher_positions`` ``(B, G)``
    int64 (padding 0) and ``mask`` ``(B, G)`` bool, ``G`` = most compared groups in a row
    (or ``width``). Row ``b``, column ``g``: compare the student's logits at
    ``student_positions[b, g]`` with the teacher's at ``teacher_positions[b, g]``."""
    rows = [[g for g in seq if g.compared] for seq in groups]
    most = max((len(r) for r in rows), default=0)
    cols = most if width is None else width
    if most > cols:
        raise ValueError(f"a row has {most} compared groups, more than width={cols}")
    student = torch.zeros((len(rows), cols), dtype=torch.long)
    teacher = torch.zeros((len(rows), cols), dtype=torch.long)
    mask = torch.zeros((len(rows), cols), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        student[b, :n] = torch.tensor([g.student_position for g in row], dtype=torch.long)
        teacher[b, :n] = torch.tensor([g.teacher_position for g in row], dtype=torch.long)
        mask[b, :n] = True
    return {"student_positions": student, "teacher_positions": teacher, "mask": mask}


# --------------------------------------------------------------------------- cache record


def teacher_alignment_record(tokenizer: Any, text: str) -> dict[str, Any]:
    """What an on-disk teacher cache must store per text to align it with any student later.

    Returns ``{"tokenizer": {"class", "name_or_path", "scheme", "vocab_size",
    "fingerprint"}, "input_ids": [...], "byte_spans": [[start, end], ...], "num_bytes"}``:
    the teacher tokenizer's identity (a SHA-256 of its ``tokenizer.json``, checked when the
    cache is reopened) and, per teacher token, the byte span it covers (zero-width for
    specials), so :func:`align_spans` needs neither the teacher tokenizer nor the teacher.
    Cached top-k rows are indexed by teacher position, like the live teacher's logits.
    """
    wrapped = SpanTokenizer(tokenizer, "teacher tokenizer")
    spans = wrapped.tokenize(text)
    return {
        "tokenizer": tokenizer_identity(wrapped),
        "input_ids": spans.input_ids,
        "byte_spans": [list(s) for s in spans.spans],
        "num_bytes": spans.num_bytes,
    }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """``{"class", "name_or_path", "scheme", "vocab_size", "fingerprint"}`` of a tokenizer:
    the ``"tokenizer"`` entry of :func:`teacher_alignment_record` (``fingerprint`` is
    :meth:`SpanTokenizer.fingerprint`, what decides whether two tokenizers are one)."""
    wrapped = SpanTokenizer(tokenizer, "teacher tokenizer")
    return {
        "class": type(wrapped.tokenizer).__name__,
        "name_or_path": str(getattr(wrapped.tokenizer, "name_or_path", "")),
        "scheme": wrapped.scheme,
        "vocab_size": wrapped.vocab_size,
        "fingerprint": wrapped.fingerprint(),
    }
