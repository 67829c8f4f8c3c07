"""A served teacher with another tokenizer: its ``top_logprobs`` on the student's side.

An OpenAI-compatible server (``distill.teacher``) scores every training text as a whole
(echo / prompt log-probabilities, :mod:`kdistill.serve.scoring`); its tokens are the
teacher's, whose tokenizer kdistill never sees. :func:`served_teacher_topk` aligns the
teacher's token bytes with the student's tokens and maps each alternative onto the student
id that spells the same bytes (or onto an extra id past the student's vocabulary), so the
cross-tokenizer losses of :mod:`kdistill.lm.uld` (ULD, Boizard et al. 2024, and the hybrid)
read it like a local teacher's top-k. The mapped rows of the whole training set are kept in
one safetensors file in ``distill.cache_dir``: the server is asked once per training set.

* :class:`ServedTeacherRows` — the mapped rows and the alignment of every training text;
* :class:`ServedCrossTokenizerCollator` — the student's batches (those of plain
  ``token_kd``) with their texts' rows packed as ``teacher.topk`` and the ``alignment``;
* :func:`load_or_score` — open the file, or score the texts and write it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdistill.distiller import IGNORE_INDEX
from kdistill.lm.alignment import SpanTokenizer, TokenSpans
from kdistill.lm.batches import causal_lm_labels, pad_right
from kdistill.lm.cross_tokenizer import VocabMap, served_teacher_topk
from kdistill.lm.topk import TOPK, pack_topk
from kdistill.serve.scoring import echoed_token_id, is_unspelt
from kdistill.serve.tokens import AMBIGUOUS, TokenizerMismatch, TokenMap
from kdistill.trainer import TEACHER_PREFIX

__all__ = [
    "ROWS_FILE",
    "ServedCacheError",
    "ServedCrossTokenizerCollator",
    "ServedTeacherRows",
    "load_or_score",
    "rows_metadata",
    "served_vocab_map",
    "teacher_records",
]

ROWS_FILE = "served_cross_tokenizer.safetensors"
_FORMAT = "kdistill.served_cross_tokenizer/1"
_TENSORS = ("log_probs", "ids", "student_positions", "teacher_positions", "mask")


class ServedCacheError(ValueError):
    """The rows file is stale (other teacher, texts, student tokenizer or k) or unreadable."""


@dataclass(frozen=True)
class ServedTeacherRows:
    """A served teacher's top-k over ``N`` training texts, mapped onto the student's side.

    ``log_probs`` ``(N, W, k)`` (``-inf`` = no entry) and ``ids`` ``(N, W, k)`` int64 (``-1`` =
    no entry) per teacher *position* ``j`` = "after ``j`` teacher tokens", in a vocabulary of
    ``vocab_size`` ids: the student's ids, then one extra id per text that no student token
    spells. ``student_positions``, ``teacher_positions``, ``mask`` ``(N, G)``: the compared
    groups of each text (:func:`~kdistill.lm.alignment.alignment_tensors`), ``mask`` false
    where the teacher gave no distribution (its first position, the end of the text).
    """

    log_probs: Tensor
    ids: Tensor
    student_positions: Tensor
    teacher_positions: Tensor
    mask: Tensor
    vocab_size: int

    @classmethod
    def from_records(
        cls,
        student: Sequence[TokenSpans],
        records: Sequence[Sequence[Any]],
        student_tokenizer: Any,
        texts: Sequence[str],
    ) -> ServedTeacherRows:
        """Map the server's per-token records of every text (:func:`served_teacher_topk`)."""
        served = served_teacher_topk(student, records, student_tokenizer, texts=texts)
        teacher, alignment = served["teacher"], served["alignment"]
        return cls(
            teacher.log_probs.float(),
            teacher.ids.long(),
            alignment["student_positions"],
            alignment["teacher_positions"],
            alignment["mask"],
            teacher.vocab_size,
        )

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).contiguous() for name in _TENSORS}

    def batch(self, rows: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The packed teacher rows ``(B, W_b, 2k + 1)`` (:func:`pack_topk`, no rest mass) and
        the alignment ``(B, G_b)`` of texts ``rows``; a group counts only where the student's
        label does (``labels (B, T)``: truncation, padding)."""
        mask = self.mask[rows]  # (B, G)
        used = mask.any(dim=0).nonzero()
        groups = int(used.max()) + 1 if used.numel() else 1
        alignment = {
            "student_positions": self.student_positions[rows, :groups],
            "teacher_positions": self.teacher_positions[rows, :groups],
            "mask": mask[:, :groups].clone(),
        }
        alignment["mask"] &= labels.gather(1, alignment["student_positions"]) != IGNORE_INDEX
        width = int(alignment["teacher_positions"].max()) + 1
        log_probs, ids = self.log_probs[rows, :width], self.ids[rows, :width]  # (B, W_b, k)
        rest = log_probs.new_zeros(log_probs.shape[:2])  # the losses renormalise the top-k
        return pack_topk(log_probs, ids, rest), alignment


@dataclass
class ServedCrossTokenizerCollator:
    """The student's causal-LM batch of training texts ``{"row": i}`` (the ids, labels and
    EOS of plain ``token_kd``) plus ``"teacher.topk"`` (the served rows, packed) and
    ``"alignment"``; ``num_bytes`` ``(B,)`` as :class:`~kdistill.lm.cross_tokenizer.
    CrossTokenizerCollator` gives."""

    student: Sequence[TokenSpans]  # the student's tokens of every training text, in row order
    teacher: ServedTeacherRows
    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of texts")
        rows = torch.tensor([int(x["row"]) for x in examples])
        spans = [self.student[int(r)] for r in rows]
        ids, mask = pad_right([s.input_ids for s in spans], self.pad_token_id)  # (B, T)
        labels = causal_lm_labels(ids, mask)
        packed, alignment = self.teacher.batch(rows, labels)
        return {
            "inputs": {"input_ids": ids, "attention_mask": mask},
            "target": labels,
            "prompt_lengths": torch.zeros(len(spans), dtype=torch.long),
            "alignment": alignment,
            "num_bytes": torch.tensor([s.num_bytes for s in spans], dtype=torch.long),
            TEACHER_PREFIX + TOPK: packed,
        }


def served_vocab_map(student_tokenizer: Any, student_logits: int, teacher_vocab: int) -> VocabMap:
    """The hybrid's matched set for :class:`ServedTeacherRows`: every student token that
    stands for bytes (the id :func:`served_teacher_topk` maps those bytes to) is matched with
    the same id on the teacher's side; special tokens and ids past the tokenizer (a padded
    output layer) are unmatched, as :func:`~kdistill.lm.cross_tokenizer.vocab_map` leaves
    them for a local teacher."""
    keys = SpanTokenizer(student_tokenizer, "student tokenizer").vocab_keys()
    first: dict[bytes | str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    ids = torch.tensor(
        [i for i, key in enumerate(keys) if isinstance(key, bytes) and first[key] == i],
        dtype=torch.long,
    )
    return VocabMap(ids, ids.clone(), student_logits, teacher_vocab)


def teacher_records(
    tokens: Sequence[Any],
    spans: TokenSpans,
    text: str,
    teacher: SpanTokenizer,
    index: int,
    k: int,
    token_map: TokenMap | None = None,
) -> list[dict[str, Any]]:
    """The server's scored tokens of training text ``index`` (sent as the ids ``spans`` of the
    teacher's tokenizer ``teacher``) as records with exact bytes: each token's bytes are its
    span of ``text``, each alternative's :meth:`SpanTokenizer.token_bytes` (a special token's
    its name, so it matches no student token). Only the ``k`` most likely alternatives are
    kept (servers add the scored token to the top ``k`` when it is not among them).

    A server that names tokens by text only (llama.cpp's, sent the text as a string) needs
    ``token_map`` — :class:`~kdistill.serve.tokens.TokenMap` of ``teacher``'s tokenizer — to
    find the ids: every echoed token must be the one ``spans`` has there, and an alternative
    no id can be read from (``''``: a special token; a partial UTF-8 byte) is left out, as the
    losses renormalise the top-k. Raises ``ValueError`` naming the text when the server
    scored other tokens or gave no ids and no ``token_map``."""
    ids = [getattr(t, "id", None) for t in tokens]
    if None in ids and token_map is not None:
        try:
            ids = [echoed_token_id(t, i, token_map, spans.input_ids) for i, t in enumerate(tokens)]
        except TokenizerMismatch as err:
            raise ValueError(f"training text {index}: {err}") from None
    if ids != list(spans.input_ids):
        raise ValueError(
            f"the server scored training text {index} as token ids {ids[:8]}… but "
            f"distill.teacher.tokenizer gives {list(spans.input_ids)[:8]}…; give the "
            "tokenizer of the served model"
        )
    raw = text.encode("utf-8")
    records = []
    for token, (start, end) in zip(tokens, spans.spans, strict=True):
        top = []
        for alt in sorted(token.top, key=lambda alt: -alt.logprob)[:k]:
            alt_id = alt.id if alt.id is not None else _alternative_id(alt, token_map)
            if alt_id is None:
                continue  # unplaceable: its mass is left to the renormalised top-k
            if not 0 <= alt_id < teacher.vocab_size:
                raise ValueError(
                    f"the server's alternative {alt.token!r} (id {alt_id}) of training text "
                    f"{index} is not a token of distill.teacher.tokenizer "
                    f"({teacher.vocab_size} ids); give the tokenizer of the served model"
                )
            piece = teacher.token_bytes(alt_id)
            entry = {"logprob": alt.logprob, "token": f"<special {alt_id}>"}
            top.append(entry if piece is None else {**entry, "bytes": list(piece)})
        records.append({"token": "", "bytes": list(raw[start:end]), "top_logprobs": top})
    return records


def _alternative_id(alt: Any, token_map: TokenMap | None) -> int | None:
    """The teacher id of an alternative named by text / bytes; ``None`` when none can be read
    (unspelt ``''``, a text several ids spell); :class:`ValueError` for a foreign token."""
    if token_map is None:
        raise ValueError(
            f"the server's alternative {alt.token!r} has no token id; give "
            "distill.teacher.tokenizer (the served model's tokenizer) to read it"
        )
    if is_unspelt(alt):
        return None
    try:
        found = token_map.lookup(alt.token, alt.bytes, None)
    except TokenizerMismatch as err:
        raise ValueError(f"{err}; give the tokenizer of the served model") from None
    return None if found == AMBIGUOUS else found


def rows_metadata(
    teacher: Mapping[str, str],
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    student: Sequence[TokenSpans],
    k: int,
) -> dict[str, str]:
    """What the rows depend on: the server (``teacher``) and its tokenizer, the student's
    tokenizer and its tokens of every text (so also ``max_length``), and ``k``."""
    digest = hashlib.sha256()
    for spans in student:
        digest.update(json.dumps([spans.input_ids, spans.spans]).encode())
    served = SpanTokenizer(teacher_tokenizer, "teacher tokenizer").fingerprint()
    return {
        "format": _FORMAT,
        "teacher": json.dumps({**teacher, "tokenizer": served}, sort_keys=True),
        "student_tokenizer": SpanTokenizer(student_tokenizer, "student tokenizer").fingerprint(),
        "texts": digest.hexdigest(),
        "k": str(k),
    }


_WHAT = {
    "teacher": "teacher server (or its tokenizer)",
    "student_tokenizer": "student tokenizer",
    "texts": "training texts",
    "k": "top-k",
}


def _read(path: Path, expected: Mapping[str, str]) -> ServedTeacherRows:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ServedCacheError(f"{path} is unreadable ({err}); delete it") from None
    if meta.get("format") != _FORMAT or set(_TENSORS) - set(tensors):
        raise ServedCacheError(f"{path} is not a served cross-tokenizer rows file; delete it")
    for key, what in _WHAT.items():
        if meta.get(key) != expected[key]:
            raise ServedCacheError(
                f"{path} is stale: it holds the rows of another {what}; set "
                "distill.cache_rebuild: true or use another distill.cache_dir"
            )
    return ServedTeacherRows(
        **{n: tensors[n] for n in _TENSORS}, vocab_size=int(meta["vocab_size"])
    )


def _write(path: Path, rows: ServedTeacherRows, metadata: Mapping[str, str]) -> None:
    """Atomically: a crash leaves the old file or none, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(rows.tensors(), str(tmp), metadata={**metadata, "vocab_size": str(rows.vocab_size)})
    os.replace(tmp, path)


def load_or_score(
    folder: str | os.PathLike[str],
    score: Callable[[], ServedTeacherRows],
    metadata: Mapping[str, str],
    *,
    rebuild: bool = False,
) -> tuple[ServedTeacherRows, bool]:
    """The rows in ``folder`` when they match ``metadata`` (:func:`rows_metadata`), else
    ``score()`` (only then is the server asked) written there. Returns ``(rows, built)``.

    Raises:
        ServedCacheError: the file is there but stale or unreadable (and not ``rebuild``).
    """
    path = Path(folder) / ROWS_FILE
    if path.exists() and not rebuild:
        return _read(path, metadata), False
    rows = score()
    _write(path, rows, metadata)
    return rows, True
