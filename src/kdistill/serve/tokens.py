"""The exact bytes of every token of a Hugging Face tokenizer, and the way back to ids.

OpenAI-compatible servers name a token by its text (``"token"``), often also by its UTF-8
bytes (``"bytes"``; llama.cpp sends ``null``) and sometimes by its id (vLLM's
``return_tokens_as_token_ids`` → ``"token_id:123"``; ``kdistill serve`` adds ``"id"``). To
distil a student on those tokens, each must become the student's id for the *same* token.

:func:`token_bytes_table` reads the bytes of each id from the tokenizer's own vocabulary:
byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen: the tokens are spelt in the 256-character
alphabet of ``bytes_to_unicode``), Metaspace / SentencePiece (Llama-2, Mistral: ``▁`` is a
space, ``<0xNN>`` a raw byte), otherwise ``decode([id])``. Added tokens (``<|im_start|>``)
are their text. Partial UTF-8 sequences keep their exact bytes — a text decode would turn
them all into ``"\\ufffd"``.

:class:`TokenMap` looks a teacher token up: by id when the server gives one (checked against
the bytes / text it also gives), else by bytes, else by text; a text shared by several ids
(only partial-UTF-8 tokens) is *ambiguous* and reported as such.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["AMBIGUOUS", "TokenMap", "TokenizerMismatch", "token_bytes_table", "token_text"]

AMBIGUOUS = -2
""":meth:`TokenMap.lookup` result for a text that several ids spell (partial UTF-8)."""


class TokenizerMismatch(ValueError):
    """A teacher token is not a token of the student's tokenizer."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character → byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [decoder]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kinds.add(str(node.get("type")))
            stack.extend(node.get("decoders") or [])
    return kinds


def token_text(piece: bytes) -> str:
    """The text a server shows for a token's bytes (invalid UTF-8 as U+FFFD)."""
    return piece.decode("utf-8", errors="replace")


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """``table[id]``: the UTF-8 bytes token ``id`` contributes to a decoded text."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    kinds = _decoder_kinds(tokenizer)
    byte_level, metaspace = "ByteLevel" in kinds, bool({"Metaspace", "ByteFallback"} & kinds)
    decoder = _byte_decoder()
    table = []
    for token_id, piece in enumerate(pieces):
        if piece is None:
            table.append(b"")
        elif piece in added:
            table.append(piece.encode("utf-8"))
        elif byte_level and all(c in decoder for c in piece):
            table.append(bytes(decoder[c] for c in piece))
        elif metaspace and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        elif metaspace:
            table.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            table.append(tokenizer.decode([token_id]).encode("utf-8"))
    return table


@dataclass
class TokenMap:
    """Teacher tokens (text / bytes / id) → the student's ids, for one shared tokenizer."""

    table: list[bytes]
    by_bytes: dict[bytes, int]
    by_text: dict[str, int]
    specials: frozenset[int] = frozenset()  # special tokens (llama.cpp spells them as '')

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenMap:
        specials = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())
        return cls.from_table(token_bytes_table(tokenizer), specials)

    @classmethod
    def from_table(cls, table: Sequence[bytes], specials: frozenset[int] = frozenset()) -> TokenMap:
        by_bytes: dict[bytes, int] = {}
        by_text: dict[str, int] = {}
        for token_id, piece in enumerate(table):
            by_bytes.setdefault(piece, token_id)
            text = token_text(piece)
            by_text[text] = AMBIGUOUS if text in by_text else token_id
        return cls(list(table), by_bytes, by_text, specials)

    def lookup(self, token: str, raw_bytes: Sequence[int] | None, token_id: int | None) -> int:
        """The student id of a teacher token; :data:`AMBIGUOUS`; or :class:`TokenizerMismatch`."""
        if token_id is not None:
            if not 0 <= token_id < len(self.table):
                raise TokenizerMismatch(
                    f"teacher token id {token_id} ({token!r}) is outside the student's "
                    f"vocabulary of {len(self.table)} ids"
                )
            mine = self.table[token_id]
            theirs = bytes(raw_bytes) if raw_bytes is not None else None
            if (theirs is not None and theirs != mine) or (
                theirs is None and not token.startswith("token_id:") and token != token_text(mine)
            ):
                raise TokenizerMismatch(
                    f"teacher token id {token_id} is {token!r} but the student's id {token_id} "
                    f"is {token_text(mine)!r}"
                )
            return token_id
        if raw_bytes is not None:
            found = self.by_bytes.get(bytes(raw_bytes))
            if found is None:
                raise TokenizerMismatch(
                    f"teacher token {token!r} (bytes {bytes(raw_bytes)!r}) is not a token of the "
                    "student's tokenizer"
                )
            return found
        found = self.by_text.get(token)
        if found is None:
            raise TokenizerMismatch(
                f"teacher token {token!r} is not a token of the student's tokenizer"
            )
        return found
