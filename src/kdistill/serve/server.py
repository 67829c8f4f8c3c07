"""``kdistill serve MODEL_DIR``: an OpenAI-compatible server for a local Hugging Face causal LM.

Routes (FastAPI, run by uvicorn):

* ``GET /v1/models`` — the one served model.
* ``POST /v1/completions`` — ``prompt`` (a string, a list of token ids, or a list of either),
  ``max_tokens`` (0 with ``echo`` scores the prompt only), ``n``, ``temperature`` (0:
  greedy), ``top_p``, ``stop``, ``seed``, ``echo``, ``logprobs: k`` (legacy format, plus a
  ``token_ids`` list), vLLM's ``prompt_logprobs: k`` (per prompt token ``{id: {logprob,
  rank, decoded_token}}``) and ``return_tokens_as_token_ids`` (tokens spelt ``token_id:N``).
* ``POST /v1/chat/completions`` — ``messages`` through the tokenizer's chat template,
  ``logprobs`` / ``top_logprobs`` (``logprobs.content[i]`` with ``token``, ``bytes``, ``id``,
  ``logprob`` and ``top_logprobs``).
* ``GET /kdistill/stats`` — requests, batches, the largest batch so far and the sizes
  (sequences) of the last 1000 batches (``history``).

**Alignment of echoed prompt log-probabilities** — the row of prompt position ``t`` is the
model's distribution *predicting token t*, i.e. ``log_softmax(logits[t − 1])``; position 0
has none (``null``), as in the OpenAI API and vLLM. (llama.cpp's server returns the
distribution predicting token ``t + 1`` there: see :mod:`kdistill.serve.scoring`.)

Log-probabilities are the model's own, ``log_softmax`` of the raw logits at ``T = 1``,
whatever the sampling temperature (vLLM's default).

**Batching** — :class:`Batcher`: requests are queued; the worker takes the first one and
keeps collecting until ``max_batch`` sequences are in, or

1. while fewer requests are in than the previous batch answered, until ``batch_patience``
   × that batch's run time after it ended: the clients it answered are likely to come
   back (a client with concurrency ``N`` sends its next ``N`` requests one by one as it
   handles the answers, spread over tens to hundreds of ms on a busy CPU); then
2. until the server has been idle for ``batch_wait_ms`` — no request queued, no POST
   request started and no POST response finished in that time (an ASGI middleware reports
   the last two).

A fixed window counted from the first request split such a burst into a batch of one and
a batch of the rest (batches 16, 1, 15, 1, 15, ...: 20–30 % of the throughput lost on
CPU, and on a GPU, where a batch of one costs about as much as a full one, nearly half;
bench/serve_throughput.py). Waiting costs at most ``batch_patience`` (10 %) of a batch's
time; a lone sequential client (previous batch: one request) is never held by rule 1.
It groups them by kind
(scoring, or generation with the same temperature / top-p / seed) and runs each group as one
padded forward (right padding) or one ``generate`` (left padding), in a worker thread so the
server keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from kdistill.serve.tokens import token_bytes_table, token_text

__all__ = [
    "Batcher",
    "GenerateItem",
    "GeneratedSequence",
    "ScoreItem",
    "ScoredSequence",
    "TeacherModel",
    "build_app",
    "load_teacher_model",
    "serve",
]


# --------------------------------------------------------------------------- the model


@dataclass
class ScoredSequence:
    """Teacher-forced scores of a token sequence ``(T,)``; row 0 is empty (no context).

    ``token_logprobs[t]`` = log p(token t | tokens < t); ``top_ids[t]`` / ``top_values[t]``
    the k most likely ids at position t (from ``logits[t − 1]``), decreasing.
    """

    ids: list[int]
    token_logprobs: list[float | None]
    top_ids: list[list[int]]
    top_values: list[list[float]]
    ranks: list[int | None]


@dataclass
class GeneratedSequence:
    """A sampled continuation: ids, per-token log-probability and top-k, why it stopped."""

    ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_values: list[list[float]]
    finish_reason: str
    text: str


class TeacherModel:
    """A causal LM and its tokenizer behind plain, synchronous scoring and generation."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        device: torch.device | str = "cpu",
        max_batch_tokens: int = 8192,
    ) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.pieces = token_bytes_table(tokenizer)
        self.texts = [token_text(p) for p in self.pieces]
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(
            gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {self.name} has no chat template; use /v1/completions"
            )
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- scoring

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped (longest first) so that rows × longest ≤ ``max_batch_tokens``."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[ScoredSequence]:
        """Teacher-forced top-k of every position of each sequence (one padded forward per
        group of sequences)."""
        out: list[ScoredSequence | None] = [None] * len(sequences)
        k = max(1, min(k, self.vocab_size))
        for group in self._batches([len(s) for s in sequences]):
            width = max(len(sequences[i]) for i in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            with self.lock:
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits  # (B, T, V)
            log_p = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (B, T-1, V): predicts t+1
            values, top = log_p.topk(k, dim=-1)  # (B, T-1, k)
            target = ids[:, 1:].to(log_p.device)  # (B, T-1)
            chosen = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            ranks = (log_p > chosen.unsqueeze(-1)).sum(-1) + 1  # (B, T-1)
            for row, i in enumerate(group):
                n = len(sequences[i]) - 1
                out[i] = ScoredSequence(
                    ids=list(sequences[i]),
                    token_logprobs=[None, *chosen[row, :n].tolist()],
                    top_ids=[[], *top[row, :n].tolist()],
                    top_values=[[], *values[row, :n].tolist()],
                    ranks=[None, *ranks[row, :n].tolist()],
                )
        return [s for s in out if s is not None]

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        stops: Sequence[Sequence[str]],
        temperature: float,
        top_p: float,
        seed: int | None,
        k: int,
    ) -> list[GeneratedSequence]:
        """One left-padded ``generate`` over ``prompts`` (each already repeated ``n`` times)."""
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(max_tokens),
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
            )
        new = out.sequences[:, width:].cpu()  # (B, S)
        log_p = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # (B, S, V)
        kk = max(1, min(k, self.vocab_size))
        values, top = log_p.topk(kk, dim=-1)  # (B, S, k)
        chosen = log_p.gather(-1, new.to(log_p.device).unsqueeze(-1)).squeeze(-1)  # (B, S)
        results = []
        for row in range(len(prompts)):
            tokens = new[row].tolist()
            length, reason = min(max_tokens[row], len(tokens)), "length"
            for t in range(length):
                if tokens[t] in self.eos_ids:
                    length, reason = t, "stop"
                    break
            length, text, stopped = self._apply_stops(tokens[:length], stops[row])
            reason = "stop" if stopped else reason
            results.append(
                GeneratedSequence(
                    ids=tokens[:length],
                    logprobs=chosen[row, :length].tolist(),
                    top_ids=top[row, :length].tolist(),
                    top_values=values[row, :length].tolist(),
                    finish_reason=reason,
                    text=text,
                )
            )
        return results

    def _apply_stops(self, tokens: list[int], stops: Sequence[str]) -> tuple[int, str, bool]:
        """Cut at the first stop string: (tokens kept, text before the stop, stopped?).

        The token that completes a stop string is dropped with it; the text ends right
        before the stop string.
        """
        text = self.decode(tokens)
        if not stops or not any(s in text for s in stops):
            return len(tokens), text, False
        for m in range(1, len(tokens) + 1):
            prefix = self.decode(tokens[:m])
            hits = [prefix.index(s) for s in stops if s in prefix]
            if hits:
                return m - 1, prefix[: min(hits)], True
        return len(tokens), text, False  # pragma: no cover - the loop always finds it


def load_teacher_model(
    model_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> TeacherModel:
    """Load a Hugging Face causal LM folder (model + tokenizer) with no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); give a folder written "
            "by save_pretrained"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return TeacherModel(model, tokenizer, name or path.name, device)


# --------------------------------------------------------------------------- batching


@dataclass
class ScoreItem:
    ids: list[int]
    k: int


@dataclass
class GenerateItem:
    ids: list[int]
    n: int
    max_tokens: int
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None
    k: int

    def group_key(self) -> tuple[Any, ...]:
        return ("generate", self.temperature, self.top_p, self.seed)


@dataclass
class _Pending:
    item: ScoreItem | GenerateItem
    future: asyncio.Future[Any]


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    sequences: int = 0
    history: list[int] = field(default_factory=list)  # sequences per batch, last 1000


class Batcher:
    """Groups work arriving with gaps under ``wait_ms`` into padded batches of at most
    ``max_batch`` sequences (see the module docstring)."""

    def __init__(
        self, model: TeacherModel, max_batch: int = 32, wait_ms: float = 5.0, patience: float = 0.1
    ) -> None:
        self.model, self.max_batch, self.wait = model, max_batch, wait_ms / 1000
        self.patience = patience  # of the previous batch's run time, waiting for its clients
        self.expect = 0  # requests the previous batch answered
        self.last_seconds = 0.0  # its run time
        self.finished_at = 0.0  # and when it ended (time.monotonic())
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.last_activity = 0.0  # time.monotonic() of the last request or response event
        self.stats = BatchStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def touch(self) -> None:
        """A request started or a response finished: the server is not idle."""
        self.last_activity = time.monotonic()

    async def submit(self, item: ScoreItem | GenerateItem) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(item, future))
        return await future

    @staticmethod
    def _size(item: ScoreItem | GenerateItem) -> int:
        return item.n if isinstance(item, GenerateItem) else 1

    async def _collect(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        self.touch()
        size = self._size(batch[0].item)
        patient_until = self.finished_at + self.patience * self.last_seconds
        while size < self.max_batch:
            if self.queue.empty():
                now = time.monotonic()
                if len(batch) < self.expect and now < patient_until:
                    wait = patient_until - now  # rule 1: the previous batch's clients
                else:
                    idle = now - self.last_activity
                    if idle >= self.wait:
                        break  # rule 2: idle for batch_wait_ms
                    wait = self.wait - idle
                try:
                    await asyncio.wait_for(self._wait_for_item(), wait)
                except asyncio.TimeoutError:
                    continue  # a request may have started meanwhile: check again
            pending = self.queue.get_nowait()
            self.touch()
            batch.append(pending)
            size += self._size(pending.item)
        return batch

    async def _wait_for_item(self) -> None:
        """Until the queue holds an item (left in it: a cancelled wait loses nothing)."""
        while self.queue.empty():
            await asyncio.sleep(self.wait / 10 or 0.0005)

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            start = time.monotonic()
            groups: dict[tuple[Any, ...], list[_Pending]] = {}
            for pending in batch:
                item = pending.item
                key = item.group_key() if isinstance(item, GenerateItem) else ("score",)
                groups.setdefault(key, []).append(pending)
            for group in groups.values():
                live = [p for p in group if not p.future.done()]  # a client may have gone
                if not live:
                    continue
                try:
                    results = await asyncio.to_thread(self._run, [p.item for p in live])
                except Exception as err:  # handed to each waiting request
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, result in zip(live, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)
            self.finished_at = time.monotonic()
            self.expect, self.last_seconds = len(batch), self.finished_at - start

    def _run(self, items: list[Any]) -> list[Any]:
        sequences = sum(self._size(i) for i in items)
        s = self.stats
        s.batches += 1
        s.requests += len(items)
        s.sequences += sequences
        s.max_batch = max(s.max_batch, sequences)
        s.history = [*s.history[-999:], sequences]
        if isinstance(items[0], ScoreItem):
            k = max(i.k for i in items)
            return self.model.score([i.ids for i in items], k)
        first = items[0]
        prompts, max_tokens, stops = [], [], []
        for item in items:
            for _ in range(item.n):
                prompts.append(item.ids)
                max_tokens.append(item.max_tokens)
                stops.append(item.stop)
        flat = self.model.generate(
            prompts, max_tokens, stops, first.temperature, first.top_p, first.seed,
            max(i.k for i in items),
        )  # fmt: skip
        out, start = [], 0
        for item in items:
            out.append(flat[start : start + item.n])
            start += item.n
        return out


# --------------------------------------------------------------------------- HTTP


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None


def _error(status: int, message: str, kind: str) -> Any:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}
    )


def build_app(
    model: TeacherModel,
    *,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    batch_patience: float = 0.1,
    max_logprobs: int = 64,
    max_model_len: int | None = None,
) -> Any:
    """The FastAPI app serving ``model`` (see the module docstring for the routes)."""
    from contextlib import asynccontextmanager

    batcher = Batcher(model, max_batch=max_batch, wait_ms=batch_wait_ms, patience=batch_patience)
    limit = max_model_len or getattr(model.model.config, "max_position_embeddings", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"kdistill serve {model.name}", lifespan=lifespan)
    app.add_middleware(_ActivityMiddleware, batcher=batcher)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, f"invalid request: {exc.errors()}", "invalid_request_error")

    def check(req: _Request, k: int | None) -> Any:
        if req.model is not None and req.model != model.name:
            return _error(
                404, f"The model {req.model!r} does not exist; this server serves {model.name!r}",
                "NotFoundError",
            )  # fmt: skip
        if req.n < 1 or req.temperature < 0 or not 0 < req.top_p <= 1:
            return _error(
                400, "need n >= 1, temperature >= 0, 0 < top_p <= 1", "invalid_request_error"
            )
        if k is not None and not 0 <= k <= max_logprobs:
            return _error(
                400, f"logprobs must be in [0, {max_logprobs}] (--max-logprobs)", "invalid_request_error"
            )  # fmt: skip
        return None

    def too_long(ids: list[int], new: int) -> Any:
        if limit is not None and len(ids) + new > limit:
            return _error(
                400, f"prompt of {len(ids)} tokens + max_tokens {new} exceeds the model's "
                f"context of {limit}", "invalid_request_error",
            )  # fmt: skip
        if not ids:
            return _error(400, "empty prompt", "invalid_request_error")
        return None

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "kdistill"}],
        }

    @app.get("/kdistill/stats")
    async def stats() -> dict[str, Any]:
        s = batcher.stats
        return {"requests": s.requests, "batches": s.batches, "max_batch": s.max_batch,
                "sequences": s.sequences, "history": list(s.history)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        if (bad := check(req, req.logprobs) or check(req, req.prompt_logprobs)) is not None:
            return bad
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]  # type: ignore[list-item]
        prompts = [model.encode(p) if isinstance(p, str) else list(p) for p in raw]  # type: ignore[arg-type]
        if any(not 0 <= i < model.vocab_size for p in prompts for i in p):
            return _error(
                400, f"token ids must be in [0, {model.vocab_size})", "invalid_request_error"
            )
        new = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            if (bad := too_long(ids, new)) is not None:
                return bad
        if new < 0 or (new == 0 and not req.echo and req.prompt_logprobs is None):
            return _error(400, "max_tokens must be >= 1 (0 only with echo or prompt_logprobs)",
                          "invalid_request_error")  # fmt: skip
        k = req.logprobs
        need_scores = (req.echo and k is not None) or req.prompt_logprobs is not None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        score_k = max(k or 0, req.prompt_logprobs or 0, 1)
        try:
            scored_all, generated_all = await asyncio.gather(
                asyncio.gather(*[batcher.submit(ScoreItem(ids, score_k)) for ids in prompts])
                if need_scores else _none(len(prompts)),
                asyncio.gather(*[
                    batcher.submit(GenerateItem(ids, req.n, new, stop, req.temperature,
                                                req.top_p, req.seed, k or 1))
                    for ids in prompts
                ]) if new > 0 else _none(len(prompts)),
            )  # fmt: skip
        except ValueError as err:
            return _error(400, str(err), "invalid_request_error")
        choices, completion_tokens = [], 0
        for p, ids in enumerate(prompts):
            scored = scored_all[p]
            samples = generated_all[p] or [None] * req.n
            for j, gen in enumerate(samples):
                completion_tokens += 0 if gen is None else len(gen.ids)
                text = (model.decode(ids) if req.echo else "") + ("" if gen is None else gen.text)
                choice: dict[str, Any] = {
                    "index": p * req.n + j,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length" if gen is None else gen.finish_reason,
                }
                if k is not None:
                    choice["logprobs"] = _legacy_logprobs(
                        model, scored if req.echo else None, gen, k, req.return_tokens_as_token_ids
                    )
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs(model, scored, req.prompt_logprobs)
                choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": choices,
            "usage": usage(sum(len(p) for p in prompts), completion_tokens),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        k = (req.top_logprobs or 0) if req.logprobs else None
        if (bad := check(req, k)) is not None:
            return bad
        try:
            ids = model.encode_chat([
                {"role": str(m.get("role")), "content": str(m.get("content", ""))}
                for m in req.messages
            ])  # fmt: skip
        except ValueError as err:
            return _error(400, str(err), "invalid_request_error")
        new = req.max_completion_tokens or req.max_tokens or 256
        if (bad := too_long(ids, new)) is not None:
            return bad
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        samples = await batcher.submit(
            GenerateItem(ids, req.n, new, stop, req.temperature, req.top_p, req.seed, k or 1)
        )
        choices = []
        for j, gen in enumerate(samples):
            logprobs = None
            if k is not None:
                logprobs = {"content": [
                    {
                        "token": model.texts[t], "logprob": lp, "bytes": list(model.pieces[t]),
                        "id": t,
                        "top_logprobs": [
                            {"token": model.texts[i], "logprob": v, "bytes": list(model.pieces[i]),
                             "id": i}
                            for i, v in zip(top[:k], vals[:k], strict=True)
                        ],
                    }
                    for t, lp, top, vals in zip(gen.ids, gen.logprobs, gen.top_ids, gen.top_values,
                                                strict=True)
                ]}  # fmt: skip
            choices.append({
                "index": j,
                "message": {"role": "assistant", "content": gen.text},
                "logprobs": logprobs,
                "finish_reason": gen.finish_reason,
            })  # fmt: skip
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": choices,
            "usage": usage(len(ids), sum(len(g.ids) for g in samples)),
        }

    return app


class _ActivityMiddleware:
    """Tells the batcher when a POST request starts and when its response has been sent
    (pure ASGI: no buffering of the body)."""

    def __init__(self, app: Any, batcher: Batcher) -> None:
        self.app, self.batcher = app, batcher

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        self.batcher.touch()

        async def send_and_touch(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.batcher.touch()

        await self.app(scope, receive, send_and_touch)


async def _none(count: int) -> list[None]:
    return [None] * count


def _top_dict(
    model: TeacherModel, ids: list[int], values: list[float], chosen: int, lp: float | None,
    as_ids: bool,
) -> dict[str, float]:  # fmt: skip
    """``{token: logprob}`` of the top-k plus the chosen token (up to k + 1 entries)."""
    spell = (lambda i: f"token_id:{i}") if as_ids else (lambda i: model.texts[i])
    row = {spell(i): v for i, v in zip(ids, values, strict=True)}
    if lp is not None:
        row.setdefault(spell(chosen), lp)
    return row


def _legacy_logprobs(
    model: TeacherModel,
    scored: ScoredSequence | None,
    gen: GeneratedSequence | None,
    k: int,
    as_ids: bool,
) -> dict[str, Any]:
    """The ``/v1/completions`` logprobs object over the echoed prompt (if any) + completion."""
    tokens: list[int] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if scored is not None:
        for t, token in enumerate(scored.ids):
            lp = scored.token_logprobs[t]
            tokens.append(token)
            values.append(lp)
            tops.append(
                None if t == 0 else
                _top_dict(model, scored.top_ids[t][:k], scored.top_values[t][:k], token, lp, as_ids)
            )  # fmt: skip
    if gen is not None:
        for token, lp, ids, vals in zip(
            gen.ids, gen.logprobs, gen.top_ids, gen.top_values, strict=True
        ):
            tokens.append(token)
            values.append(lp)
            tops.append(_top_dict(model, ids[:k], vals[:k], token, lp, as_ids))
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(model.texts[token])
    return {
        "tokens": [f"token_id:{t}" if as_ids else model.texts[t] for t in tokens],
        "token_logprobs": values,
        "top_logprobs": tops if k > 0 else [None] * len(tokens),
        "text_offset": offsets,
        "token_ids": tokens,
    }


def _prompt_logprobs(
    model: TeacherModel, scored: ScoredSequence | None, k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token ``{id: {logprob, rank, decoded_token}}``
    — the prompt token itself and the top-k of its position; ``None`` at position 0."""
    assert scored is not None
    rows: list[dict[str, dict[str, Any]] | None] = [None]
    for t in range(1, len(scored.ids)):
        token = scored.ids[t]
        row = {
            str(token): {
                "logprob": scored.token_logprobs[t],
                "rank": scored.ranks[t],
                "decoded_token": model.texts[token],
            }
        }
        for rank, (i, v) in enumerate(
            zip(scored.top_ids[t][:k], scored.top_values[t][:k], strict=True), 1
        ):
            row.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": model.texts[i]})
        rows.append(row)
    return rows


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    batch_patience: float = 0.1,
    max_logprobs: int = 64,
) -> None:
    """Load ``model_dir`` and serve it until interrupted (``kdistill serve``)."""
    import uvicorn

    teacher = load_teacher_model(model_dir, name=name, device=device, dtype=dtype)
    app = build_app(
        teacher,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        batch_patience=batch_patience,
        max_logprobs=max_logprobs,
    )
    print(
        f"kdistill serve: {teacher.name} on {teacher.device} at http://{host}:{port}/v1",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
