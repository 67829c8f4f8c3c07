"""Teacher-forced scoring of given text by a served teacher, with an alignment self-check.

To fill a top-k teacher cache (:mod:`kdistill.cache`) from a server, each training text is
sent to ``/v1/completions`` and the server returns, for every position ``t`` of the text,
the teacher's top-k log-probabilities of the token at ``t`` given tokens ``< t``:

* ``prompt_logprobs: k`` (vLLM, ``kdistill serve``): per position ``{id: {logprob, rank,
  decoded_token}}``, keyed by id — used when the texts are sent as token ids;
* ``echo: true, logprobs: k, max_tokens: 1`` (OpenAI legacy, vLLM, llama.cpp,
  ``kdistill serve``): ``logprobs.tokens`` / ``top_logprobs`` over the echoed prompt, keyed
  by token text (or ``token_id:N`` with ``return_tokens_as_token_ids``).

**Alignment.** The correct row of position ``t`` is the distribution *predicting* token
``t`` (from the context ``< t``); position 0 has none. llama.cpp's server returns, at
position ``t``, the distribution predicting token ``t + 1`` — a student distilled on that
learns every target one step late. :func:`check_alignment` tells the two apart without
trusting the model to be any good (it works for a random model): it asks for the greedy
next token ``g`` after a counting prompt ``P`` (with its top-k row ``d`` — the distribution
after ``P``), then scores ``P`` and ``P + g``: an aligned server shows ``d`` at the
position of ``g`` in ``P + g``; a shifted one shows ``d`` at the last position of ``P``.
:func:`score_texts` refuses a shifted server (:class:`MisalignedServerError`) unless
``on_shift="correct"``, which moves every row one position later and says so (a warning).
A server that returns no prompt log-probabilities at all raises :class:`ScoringUnsupported`,
pointing to ``kdistill generate`` + sequence-level KD.

**Servers without token ids** (llama-cpp-python's: a token-id prompt is an HTTP 500
validation error; tokens are named by text; the shifted echo has no row at position 0): the
texts go out as strings (``score_texts(..., strings=...)``), an echoed special token spelt
``''`` or a partial-UTF-8 text is read as the id the caller's text has there
(:func:`echoed_token_id`), and the missing first row is the top-k of the token generated
after the first token alone.

:func:`topk_rows` turns scored positions into the cache's top-k layout (row ``t`` predicts
token ``t + 1``, as the logits of a causal LM at ``t``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kdistill.config import ConfigError
from kdistill.serve.client import EndpointRejected, OpenAIClient, TokenLogprob, TopToken
from kdistill.serve.tokens import AMBIGUOUS, TokenizerMismatch, TokenMap, token_text

__all__ = [
    "COUNTING_PROMPT",
    "REST_FLOOR",
    "Alignment",
    "MisalignedServerError",
    "ScoredText",
    "ScoringUnsupported",
    "check_alignment",
    "echoed_token_id",
    "is_unspelt",
    "placeholder_rows",
    "rest_log_mass",
    "score_texts",
    "score_texts_sync",
    "topk_row",
    "topk_rows",
]

COUNTING_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
REST_FLOOR = math.log(1e-10)
"""Log-mass outside the top-k when the returned top-k already sums to 1 (rounding)."""
MATCH_TOLERANCE = 0.05  # nats: mean |Δ log p| over the shared tokens of two rows


class ScoringUnsupported(ConfigError):
    """The server cannot return log-probabilities of given text."""


class MisalignedServerError(ConfigError):
    """The server's echoed prompt log-probabilities are shifted by one position."""


Alignment = Literal["aligned", "shifted"]


@dataclass
class ScoredText:
    """Per position ``t`` of a scored text: its token, and the top-k row predicting it
    (``tokens[t].top``; empty at ``t = 0``). ``corrected``: rows were moved one position
    later because the server shifts them."""

    tokens: list[TokenLogprob]
    corrected: bool = False


def _row_distance(a: Sequence[TopToken], b: Sequence[TopToken]) -> float:
    """Mean |Δ log p| over the tokens two rows share; ``inf`` if they share too few."""
    da, db = {t.token: t.logprob for t in a}, {t.token: t.logprob for t in b}
    shared = set(da) & set(db)
    if not shared or len(shared) < min(len(da), len(db)) / 2:
        return math.inf
    return sum(abs(da[t] - db[t]) for t in shared) / len(shared)


async def _echo(
    client: OpenAIClient, model: str, prompt: str | list[int], k: int, as_ids: bool
) -> tuple[list[TokenLogprob], int | None]:
    """The echoed prompt tokens (with their rows as the server gives them)."""
    base = {"model": model, "prompt": prompt, "echo": True, "logprobs": k, "temperature": 0.0}
    if as_ids:
        base["return_tokens_as_token_ids"] = True
    # max_tokens 1, not 0: llama.cpp's server reads 0 as "until the context is full" (985
    # tokens, ≈ 16 s a text on CPU); the one generated token is cut off by _cut
    choices, body = await client.completions({**base, "max_tokens": 1})
    tokens = choices[0].tokens if choices else None
    if not tokens:
        raise ScoringUnsupported(
            f"{client.base_url}: /completions with echo + logprobs returned no prompt "
            "log-probabilities, so this server cannot score given text; distil from it with "
            "`kdistill generate` and sequence-level KD on the generated file instead"
        )
    prompt_tokens = (body.get("usage") or {}).get("prompt_tokens")
    return tokens, prompt_tokens


def _cut(
    tokens: list[TokenLogprob], prompt: str | list[int], prompt_tokens: int | None
) -> list[TokenLogprob]:
    """The echoed tokens of the prompt only (a server may append a generated one)."""
    if isinstance(prompt, list):
        return tokens[: len(prompt)]
    if prompt_tokens is not None and 0 < prompt_tokens <= len(tokens):
        return tokens[:prompt_tokens]
    out, length = [], 0
    for token in tokens:
        if length >= len(prompt):
            break
        out.append(token)
        length += len(token.token)
    return out


async def check_alignment(client: OpenAIClient, model: str, k: int = 5) -> Alignment:
    """``"aligned"`` or ``"shifted"`` echo rows (see the module docstring); raises
    :class:`MisalignedServerError` when neither matches (an unknown convention)."""
    choices, _ = await client.completions(
        {"model": model, "prompt": COUNTING_PROMPT, "max_tokens": 1, "temperature": 0.0,
         "logprobs": k}
    )  # fmt: skip
    if not choices or not choices[0].tokens or not choices[0].tokens[0].top:
        raise ScoringUnsupported(
            f"{client.base_url}: /completions returned no logprobs for a generated token; "
            "this server cannot be checked or used for token-level scoring — use `kdistill "
            "generate` + sequence-level KD instead"
        )
    generated = choices[0].tokens[0]
    after_prompt = generated.top  # the distribution after P, by construction
    alone, used = await _echo(client, model, COUNTING_PROMPT, k, as_ids=False)
    alone = _cut(alone, COUNTING_PROMPT, used)
    extended_text = COUNTING_PROMPT + generated.token
    extended, used = await _echo(client, model, extended_text, k, as_ids=False)
    extended = _cut(extended, extended_text, used)
    aligned = math.inf
    offset = 0
    for token in extended:
        if offset == len(COUNTING_PROMPT):  # the token that starts at g
            aligned = _row_distance(token.top, after_prompt)
            break
        offset += len(token.token)
    shifted = _row_distance(alone[-1].top, after_prompt) if alone else math.inf
    if aligned <= MATCH_TOLERANCE and not shifted <= MATCH_TOLERANCE:
        return "aligned"
    if shifted <= MATCH_TOLERANCE and not aligned <= MATCH_TOLERANCE:
        return "shifted"
    raise MisalignedServerError(
        f"{client.base_url}: cannot tell which position the echoed prompt log-probabilities "
        f"belong to (distance to the generated token's row: aligned {aligned:.3g}, shifted "
        f"{shifted:.3g} nats); refusing to distil from them. Use `kdistill generate` + "
        "sequence-level KD, or a server that scores prompts correctly (vLLM, kdistill serve)"
    )


def _shift_later(tokens: list[TokenLogprob]) -> list[TokenLogprob]:
    """Row of position t := the server's row t − 1 (the distribution that predicts t)."""
    out = [TokenLogprob(tokens[0].token, None, tokens[0].bytes, tokens[0].id, ())]
    for prev, token in itertools.pairwise(tokens):
        top = prev.top
        lp = next((t.logprob for t in top if t.token == token.token), None)
        out.append(TokenLogprob(token.token, lp, token.bytes, token.id, top))
    return out


def _from_prompt_logprobs(ids: list[int], rows: list[Any], k: int) -> list[TokenLogprob]:
    tokens = []
    for t, token_id in enumerate(ids):
        row = rows[t] if t < len(rows) else None
        if t == 0 or row is None:
            tokens.append(TokenLogprob(f"token_id:{token_id}", None, id=token_id))
            continue
        entries = sorted(
            ((int(i), float(v["logprob"])) for i, v in row.items()), key=lambda e: -e[1]
        )[: k + 1]
        mine = row.get(str(token_id))
        tokens.append(
            TokenLogprob(
                f"token_id:{token_id}",
                None if mine is None else float(mine["logprob"]),
                id=token_id,
                top=tuple(TopToken(f"token_id:{i}", v, id=i) for i, v in entries),
            )
        )
    return tokens


async def score_texts(
    client: OpenAIClient,
    model: str,
    texts: Sequence[str] | Sequence[Sequence[int]],
    k: int,
    *,
    method: Literal["auto", "prompt_logprobs", "echo"] = "auto",
    on_shift: Literal["refuse", "correct"] = "refuse",
    strings: Sequence[str] | None = None,
) -> list[ScoredText]:
    """Score every text (a string, or token ids of the teacher's tokenizer) at every position.

    Runs :func:`check_alignment` first whenever the echo method is used. Requests go out
    concurrently (bounded by the client).

    ``strings``: with token-id texts, the same texts as strings, sent instead when the server
    rejects token-id prompts (llama-cpp-python's server: HTTP 500, "Input should be a valid
    string") — it then tokenises them itself, so the caller must check that the echoed
    tokens are its ids. Without them, such a server is a :class:`ScoringUnsupported`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    as_ids = bool(texts) and not isinstance(texts[0], str)
    if strings is not None and len(strings) != len(texts):
        raise ValueError(f"{len(strings)} strings for {len(texts)} texts")
    use_prompt_logprobs = method == "prompt_logprobs" or (method == "auto" and as_ids)
    if use_prompt_logprobs:
        if not as_ids:
            raise ValueError("prompt_logprobs scoring needs token ids (ids identify the rows)")
        try:
            first = await _prompt_logprobs(client, model, list(texts[0]), k)  # type: ignore[arg-type]
        except EndpointRejected:
            if method == "prompt_logprobs":
                raise
            first = None  # the ids or the field refused: try echo, which says which
        if first is not None:
            rest = await asyncio.gather(
                *[_prompt_logprobs(client, model, list(t), k) for t in texts[1:]]  # type: ignore[arg-type]
            )
            return [ScoredText(s) for s in [first, *rest] if s is not None]
        if method == "prompt_logprobs":
            raise ScoringUnsupported(
                f"{client.base_url}: the server ignores prompt_logprobs; use method: echo"
            )
    alignment = await check_alignment(client, model, min(k, 5))
    if alignment == "shifted" and on_shift == "refuse":
        raise MisalignedServerError(
            f"{client.base_url}: this server's echoed prompt log-probabilities are shifted by "
            "one position (the row of token t is the distribution predicting token t + 1, as "
            "llama.cpp's server does); distilling them would train on shifted targets. Set "
            "distill.teacher.on_shift: correct to move them back, or use vLLM / kdistill serve"
        )
    if alignment == "shifted":
        warnings.warn(
            f"{client.base_url}: echoed prompt log-probabilities are shifted by one position; "
            "correcting them (row t := the server's row t − 1)",
            stacklevel=2,
        )

    async def one(prompt: str | list[int]) -> ScoredText:
        # ids where the server can (vLLM, kdistill serve): texts of partial UTF-8 tokens collide
        tokens, used = await _echo(client, model, prompt, k, as_ids=True)
        tokens = _cut(tokens, prompt, used)
        if alignment == "shifted":
            fixed = _shift_later(tokens)
            if len(fixed) > 1 and not fixed[1].top:  # llama.cpp returns no row at position 0
                top = await _row_after_first_token(client, model, prompt, fixed[0], k)
                fixed[1] = dataclasses.replace(fixed[1], top=top)
            return ScoredText(fixed, corrected=True)
        first = TokenLogprob(tokens[0].token, None, tokens[0].bytes, tokens[0].id)
        return ScoredText([first, *tokens[1:]])  # position 0 has no context: no row

    prompts: list[str | list[int]] = [t if isinstance(t, str) else list(t) for t in texts]
    if not as_ids:
        return list(await asyncio.gather(*[one(p) for p in prompts]))
    try:  # one text first: does the server take token-id prompts?
        head = await one(prompts[0])
    except EndpointRejected as err:
        if strings is None:
            raise ScoringUnsupported(
                f"{client.base_url}: the server rejects token-id prompts ({err}); score the "
                "texts as strings, or use a server that takes ids (vLLM, kdistill serve)"
            ) from None
        warnings.warn(
            f"{client.base_url}: the server rejects token-id prompts; sending the texts as "
            "strings (it tokenises them itself; the tokens it echoes are checked against the "
            "ids)",
            stacklevel=2,
        )
        prompts = list(strings)
        head = await one(prompts[0])
    return [head, *await asyncio.gather(*[one(p) for p in prompts[1:]])]


async def _row_after_first_token(
    client: OpenAIClient, model: str, prompt: str | list[int], first: TokenLogprob, k: int
) -> tuple[TopToken, ...]:
    """The distribution predicting a text's second token, for a shifted server that returns
    no row at position 0 (llama.cpp): the top-k of the token it would generate after the
    first token alone. Empty when the first token cannot be sent alone (a special token the
    server spells as ''); :func:`topk_rows` then names the missing row."""
    head: str | list[int] = prompt[:1] if isinstance(prompt, list) else first.token
    if not head:
        return ()
    choices, body = await client.completions(
        {"model": model, "prompt": head, "max_tokens": 1, "temperature": 0.0, "logprobs": k}
    )
    used = (body.get("usage") or {}).get("prompt_tokens")
    if not choices or not choices[0].tokens or used not in (None, 1):
        return ()  # re-tokenised as more than one token: not the same context
    return choices[0].tokens[0].top


async def _prompt_logprobs(
    client: OpenAIClient, model: str, ids: list[int], k: int
) -> list[TokenLogprob] | None:
    choices, _ = await client.completions(
        {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
    )
    rows = choices[0].extra.get("prompt_logprobs") if choices else None
    if rows is None:
        return None
    return _from_prompt_logprobs(ids, rows, k)


def score_texts_sync(
    client_factory: Any,
    model: str,
    texts: Sequence[str] | Sequence[Sequence[int]],
    k: int,
    **kwargs: Any,
) -> list[ScoredText]:
    """:func:`score_texts` from synchronous code; ``client_factory()`` makes the client
    (e.g. ``TeacherEndpointConfig.client``), closed at the end."""

    async def run() -> list[ScoredText]:
        async with client_factory() as client:
            return await score_texts(client, model, texts, k, **kwargs)

    return asyncio.run(run())


# --------------------------------------------------------------------------- top-k layout


def rest_log_mass(values: Tensor) -> Tensor:
    """``log(1 − Σ exp(values))`` over the last dim, computed as ``log(−expm1(lse))``
    (accurate when the top-k hold almost all the mass), floored at :data:`REST_FLOOR`."""
    lse = torch.logsumexp(values.double(), dim=-1)  # (...)
    rest = torch.log(-torch.expm1(lse.clamp(max=0.0)))
    return rest.clamp(min=REST_FLOOR).float()


def placeholder_rows(rows: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Valid rows for positions with no teacher row (labels there must be ignored): the
    uniform distribution over ``k + 1`` buckets on ids ``0 … k − 1`` and the rest."""
    value = -math.log(k + 1)
    return (
        torch.full((rows, k), value),
        torch.arange(k).expand(rows, k).clone(),
        torch.full((rows,), value),
    )


def is_unspelt(entry: TopToken | TokenLogprob) -> bool:
    """A token the server names by nothing: ``''`` with no bytes and no id (llama.cpp's
    rendering of a special token)."""
    return entry.token == "" and not entry.bytes and entry.id is None


def topk_row(
    top: Sequence[TopToken], k: int, token_map: TokenMap
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One top row → ``values (k)``, ``indices (k)``, ``rest ()``, count of entries left out.

    The ``k`` largest entries with a student id are kept, in decreasing order; missing
    columns get ``−inf`` on ids not in the row. Two kinds of entry cannot be placed on an id
    and leave their mass in the rest bucket: an ambiguous text (a partial UTF-8 byte that
    several ids spell) and an *unspelt* alternative — empty text, no bytes, no id: how
    llama.cpp's server shows a special token (e.g. ``<|im_end|>``) among the top-k. Any other
    entry that is not a student token raises :class:`TokenizerMismatch` (another tokenizer).
    """
    ids_values: dict[int, float] = {}
    left_out = 0
    for entry in top:
        if is_unspelt(entry):
            left_out += 1
            continue
        token_id = token_map.lookup(entry.token, entry.bytes, entry.id)
        if token_id == AMBIGUOUS:
            left_out += 1
            continue
        ids_values[token_id] = max(ids_values.get(token_id, -math.inf), entry.logprob)
    kept = sorted(ids_values.items(), key=lambda e: -e[1])[:k]
    values = torch.tensor([v for _, v in kept], dtype=torch.float64)
    rest = rest_log_mass(values) if kept else torch.tensor(0.0)
    used = {i for i, _ in kept}
    filler = (i for i in range(len(token_map.table)) if i not in used)
    ids = [i for i, _ in kept] + [next(filler) for _ in range(k - len(kept))]
    full = torch.cat([values.float(), torch.full((k - len(kept),), -math.inf)])
    return full, torch.tensor(ids), rest, left_out


def topk_rows(
    scored: ScoredText, k: int, token_map: TokenMap, expected: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The cache's top-k layout of a scored text of ``T`` tokens.

    Returns ``values (T, k)``, ``indices (T, k)`` int64, ``rest_log_mass (T,)`` where row
    ``t`` is the distribution predicting token ``t + 1`` (the server's row of position
    ``t + 1``); the last row, which predicts past the text, is a placeholder
    (:func:`placeholder_rows`). Also the text's token ids in the student's vocabulary.
    ``expected``: the ids the caller sent (or whose text it sent); an echoed token the
    server names by nothing (``''`` without bytes: llama.cpp's rendering of a special token
    such as the EOS) is taken as the expected id when that is a special token, and a text
    that several ids spell (a partial UTF-8 byte) as the expected id when it is one of them.
    Raises :class:`~kdistill.config.ConfigError` when a token is not the student's.
    """
    tokens = scored.tokens
    try:
        ids = [echoed_token_id(t, i, token_map, expected) for i, t in enumerate(tokens)]
        values, indices, rest = placeholder_rows(len(tokens), k)
        for t in range(len(tokens) - 1):
            if not tokens[t + 1].top:
                raise ConfigError(
                    f"distill.teacher: the server returned no log-probabilities for token "
                    f"{t + 1} ({tokens[t + 1].token!r}) of a scored text, so it has no teacher "
                    "row to distil; use a server that scores every prompt position (vLLM, "
                    "kdistill serve)"
                )
            v, i, r, _ = topk_row(tokens[t + 1].top, k, token_map)
            values[t], indices[t], rest[t] = v, i, r
    except TokenizerMismatch as err:
        raise ConfigError(
            f"distill.teacher: {err}; the teacher's and the student's tokenizers differ, so "
            "token-level KD from this server is impossible here — use sequence-level KD "
            "(kdistill generate + data.generated_file) or a student with the teacher's tokenizer"
        ) from None
    if AMBIGUOUS in ids:
        raise ConfigError(
            "distill.teacher: a scored token's text matches several student ids (a partial "
            "UTF-8 byte); send the texts as token ids, or use a server that returns bytes"
        )
    return values, indices, rest, ids


def echoed_token_id(
    token: TokenLogprob, position: int, token_map: TokenMap, expected: Sequence[int] | None
) -> int:
    """The id of echoed token ``position`` of a text whose ids were ``expected`` (see
    :func:`topk_rows`); :data:`AMBIGUOUS`, or :class:`TokenizerMismatch`."""
    if is_unspelt(token):
        want = expected[position] if expected is not None and position < len(expected) else None
        if want is not None and want in token_map.specials:
            return want
        raise TokenizerMismatch(
            f"the server names scored token {position} by nothing ('' without bytes or id), "
            f"where the text has {'no token' if want is None else f'token id {want}'}"
        )
    found = token_map.lookup(token.token, token.bytes, token.id)
    want = expected[position] if expected is not None and position < len(expected) else None
    spelt_as_want = want is not None and 0 <= want < len(token_map.table)
    if found == AMBIGUOUS and spelt_as_want and token_text(token_map.table[want]) == token.token:
        return want  # one of the ids that text may be
    return found
