"""``kdistill generate``: teacher completions for a prompts file, from a served teacher.

The output is an append-only JSON Lines file (:mod:`kdistill.serve.records` reads it):

* line 1, the **header**: ``{"kind": "header", "format": "kdistill-generated", "version",
  "endpoint", "settings" (api, model, n, temperature, top_p, max_tokens, stop, seed,
  logprobs, system_prompt), "prompts" (file, sha256, count), "created", "kdistill_version"}``
  — never the API key;
* one **record** per (prompt, sample): ``{"kind": "completion", "prompt_index",
  "sample_index", "prompt" | "messages", "completion", "finish_reason", "tokens", "usage"}``
  where ``tokens`` (or ``null`` when the server sent no log-probabilities) lists per
  completion token ``{"token", "bytes", "id", "logprob", "top_logprobs": [{"token", "bytes",
  "id", "logprob"}, ...]}``.

Each response's records are written and flushed as soon as it arrives, in arrival order, in
one synchronous step (the records of two responses never interleave); the ``fsync`` that
makes them durable runs in a thread, coalesced (:class:`_GroupSync`: writes made while one
``fsync`` runs share the next), so the worker sends its next request at once instead of
holding every other worker for ≈ 4 ms per response — which spread a burst of requests past
the server's batching window (bench/serve_throughput.py). A run ends only after a final
``fsync``. A re-run reads the file back (:func:`open_output`): a torn last line (a kill during a
write) is cut off, every complete record's ``(prompt_index, sample_index)`` counts as done,
and only the missing samples are requested — so a run killed at any moment and re-run
answers every prompt exactly once. A header written with other settings or another prompts
file is refused (a different endpoint is allowed: a teacher may move).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import kdistill
from kdistill.config import ConfigError
from kdistill.serve.client import (
    Choice,
    EndpointRejected,
    OpenAIClient,
    TokenLogprob,
    sampling_payload,
)
from kdistill.serve.config import GenerateConfig
from kdistill.serve.prompts import Prompt, file_sha256, read_prompts

__all__ = [
    "FORMAT",
    "VERSION",
    "GenerateResult",
    "OutputState",
    "header_record",
    "open_output",
    "run_generate",
    "token_record",
]

FORMAT = "kdistill-generated"
VERSION = 1


@dataclass
class OutputState:
    """What an existing output file holds: its header, the finished keys, bytes cut off."""

    header: dict[str, Any] | None
    done: set[tuple[int, int]] = field(default_factory=set)
    truncated_bytes: int = 0


@dataclass
class GenerateResult:
    output: Path
    prompts: int
    samples_written: int  # by this run
    samples_skipped: int  # already in the file
    requests: int
    retries: int
    tokens_in: int
    tokens_out: int
    seconds: float
    truncated_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_out / self.seconds if self.seconds > 0 else 0.0


def header_record(cfg: GenerateConfig, prompts_sha256: str, count: int) -> dict[str, Any]:
    return {
        "kind": "header",
        "format": FORMAT,
        "version": VERSION,
        "endpoint": cfg.teacher.endpoint,
        "settings": cfg.settings(),
        "prompts": {"file": str(cfg.prompts.file), "sha256": prompts_sha256, "count": count},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kdistill_version": kdistill.__version__,
    }


def _fsync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def open_output(path: Path) -> OutputState:
    """Read back an output file: header, finished keys; cut a torn last line off (fsynced)."""
    if not path.exists() or path.stat().st_size == 0:
        return OutputState(header=None)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    truncated = len(data) - end
    if truncated:
        with open(path, "r+b") as handle:
            handle.truncate(end)
            _fsync(handle)
    state = OutputState(header=None, truncated_bytes=truncated)
    for line_no, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"output: {path}:{line_no} is not valid JSON ({err.msg}) although complete; "
                "the file was edited or damaged — move it away and re-run"
            ) from None
        if line_no == 1:
            if record.get("kind") != "header" or record.get("format") != FORMAT:
                raise ConfigError(
                    f"output: {path} exists and is not a kdistill generate file (no header on "
                    "line 1); choose another output path"
                )
            state.header = record
            continue
        if record.get("kind") == "completion":
            state.done.add((int(record["prompt_index"]), int(record["sample_index"])))
    if state.header is None:  # only a torn header was there
        return OutputState(header=None, truncated_bytes=truncated)
    return state


def _check_resumable(state: OutputState, header: Mapping[str, Any], path: Path) -> None:
    old = state.header
    assert old is not None
    if old.get("version") != VERSION:
        raise ConfigError(f"output: {path} has format version {old.get('version')}, not {VERSION}")
    for key in sorted(set(old["settings"]) | set(header["settings"])):
        was, now = old["settings"].get(key), header["settings"].get(key)
        if was != now:
            name = "teacher." + key if key in ("api", "model") else "sampling." + key
            raise ConfigError(
                f"output: {path} was generated with {name} = {was!r}, this config has {now!r}; "
                "use another output file, or set it back to continue that run"
            )
    if old["prompts"]["sha256"] != header["prompts"]["sha256"]:
        raise ConfigError(
            f"output: {path} was generated from another prompts file (sha256 "
            f"{old['prompts']['sha256'][:12]}…, now {header['prompts']['sha256'][:12]}…); use "
            "another output file"
        )


def token_record(token: TokenLogprob) -> dict[str, Any]:
    return {
        "token": token.token,
        "bytes": token.bytes,
        "id": token.id,
        "logprob": token.logprob,
        "top_logprobs": [
            {"token": t.token, "bytes": t.bytes, "id": t.id, "logprob": t.logprob}
            for t in token.top
        ],
    }


class _GroupSync:
    """``fsync`` of an output file off the event loop, coalesced (group commit).

    :meth:`kick` after a write (already flushed to the OS): a single background task runs
    ``os.fsync`` in a thread while writes keep arriving, one ``fsync`` for all writes made
    before it started. :meth:`drain` waits for the last one and raises its error, if any.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self.fd = handle.fileno()
        self.dirty = False
        self.task: asyncio.Task[None] | None = None
        self.syncs = 0

    def kick(self) -> None:
        self.dirty = True
        if self.task is None or self.task.done():
            if self.task is not None and not self.task.cancelled() and self.task.exception():
                raise self.task.exception()  # type: ignore[misc]
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.dirty:
            self.dirty = False
            await asyncio.to_thread(os.fsync, self.fd)
            self.syncs += 1

    async def drain(self) -> None:
        if self.task is not None:
            await self.task
        if self.dirty:  # a write after the task's last check
            await self._run()


def _completion_record(
    prompt: Prompt, sample: int, choice: Choice, usage: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "kind": "completion",
        "prompt_index": prompt.index,
        "sample_index": sample,
        **prompt.as_record(),
        "completion": choice.text,
        "finish_reason": choice.finish_reason,
        "tokens": None if choice.tokens is None else [token_record(t) for t in choice.tokens],
        "usage": dict(usage) if usage else None,
    }


def _payload(cfg: GenerateConfig, prompt: Prompt, n: int) -> dict[str, Any]:
    s, chat = cfg.sampling, cfg.teacher.api == "chat"
    payload = sampling_payload(
        cfg.teacher.model,
        n=n,
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        stop=s.stop,
        seed=s.seed,
        logprobs=s.logprobs,
        chat=chat,
    )
    if chat:
        messages = (
            [dict(m) for m in prompt.messages]
            if prompt.messages is not None
            else [{"role": "user", "content": prompt.prompt}]
        )
        if s.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": s.system_prompt})
        payload["messages"] = messages
    else:
        assert prompt.messages is None, "checked in run_generate"
        payload["prompt"] = prompt.prompt
    return payload


class _Progress:
    """tqdm over samples, with requests, tokens in/out and tokens/s (a terminal only)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="generate", dynamic_ncols=True)
        self.requests = self.tokens_in = self.tokens_out = 0
        self.start = time.perf_counter()

    def update(self, samples: int, usage: Mapping[str, Any] | None) -> None:
        self.requests += 1
        if usage:
            self.tokens_in += int(usage.get("prompt_tokens") or 0)
            self.tokens_out += int(usage.get("completion_tokens") or 0)
        if self.bar is not None:
            rate = self.tokens_out / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(
                req=self.requests, tok_in=self.tokens_in, tok_out=self.tokens_out,
                tok_s=f"{rate:.1f}", refresh=False,
            )  # fmt: skip
            self.bar.update(samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _generate(
    cfg: GenerateConfig,
    client: OpenAIClient,
    jobs: list[tuple[Prompt, list[int]]],
    handle: IO[bytes],
    progress: _Progress,
) -> int:
    """Run ``jobs`` (a prompt and its missing sample indices) with ``concurrency`` workers."""
    queue: asyncio.Queue[tuple[Prompt, list[int]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    written = 0
    sync = _GroupSync(handle)

    def write(prompt: Prompt, samples: list[int], choices: list[Choice], usage: Any) -> int:
        # No await in here: records of one response go out together, never interleaved.
        choices = sorted(choices, key=lambda c: c.index)[: len(samples)]
        lines = [
            json.dumps(_completion_record(prompt, sample, choice, usage), ensure_ascii=False)
            for sample, choice in zip(samples, choices, strict=False)
        ]
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
        handle.flush()  # to the OS: survives a killed process; fsync'd by `sync`
        sync.kick()
        progress.update(len(choices), usage)
        return len(choices)

    async def worker() -> None:
        nonlocal written
        chat = cfg.teacher.api == "chat"
        while True:
            try:
                prompt, samples = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            while samples:  # a server may return fewer choices than n: ask again for the rest
                payload = _payload(cfg, prompt, len(samples))
                call = client.chat if chat else client.completions
                choices, body = await call(payload)
                if not choices:
                    raise EndpointRejected(
                        f"{cfg.teacher.endpoint}: a response with no choices for prompt "
                        f"{prompt.index} (line {prompt.line})"
                    )
                done = write(prompt, samples, choices, body.get("usage"))
                written += done
                samples = samples[done:]

    workers = [asyncio.create_task(worker()) for _ in range(cfg.teacher.concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await sync.drain()  # every finished record durable before returning or raising
    return written


def _progress_enabled(mode: str) -> bool:
    return mode == "on" or (mode == "auto" and sys.stderr.isatty())


def run_generate(cfg: GenerateConfig, client: OpenAIClient | None = None) -> GenerateResult:
    """Generate the missing (prompt, sample) records of ``cfg.output`` (see the module doc)."""
    prompts = read_prompts(
        cfg.prompts.file, cfg.prompts.format, cfg.prompts.field, cfg.prompts.limit
    )
    for prompt in prompts:
        if prompt.messages is not None and cfg.teacher.api != "chat":
            raise ConfigError(
                f"prompts.file: {cfg.prompts.file}:{prompt.line} is a chat record ('messages') "
                "but teacher.api is completions; set teacher.api: chat"
            )
    header = header_record(cfg, file_sha256(cfg.prompts.file), len(prompts))
    path = cfg.output_path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = open_output(path)
    if state.header is not None:
        _check_resumable(state, header, path)
    n = cfg.sampling.n
    jobs = []
    for prompt in prompts:
        missing = [j for j in range(n) if (prompt.index, j) not in state.done]
        if missing:
            jobs.append((prompt, missing))
    todo = sum(len(m) for _, m in jobs)
    own_client = client is None
    client = cfg.teacher.client() if client is None else client
    progress = _Progress(todo, _progress_enabled(cfg.progress))
    start = time.perf_counter()
    written = 0
    try:
        with open(path, "ab") as handle:
            if state.header is None:
                handle.write(json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n")
                _fsync(handle)
            if jobs:
                written = asyncio.run(_run_jobs(cfg, client, jobs, handle, progress, own_client))
            elif own_client:
                asyncio.run(client.aclose())
    finally:
        progress.close()
    return GenerateResult(
        output=path,
        prompts=len(prompts),
        samples_written=written,
        samples_skipped=len(prompts) * n - todo,
        requests=client.attempts,
        retries=client.retries,
        tokens_in=progress.tokens_in,
        tokens_out=progress.tokens_out,
        seconds=time.perf_counter() - start,
        truncated_bytes=state.truncated_bytes,
    )


async def _run_jobs(
    cfg: GenerateConfig,
    client: OpenAIClient,
    jobs: list[tuple[Prompt, list[int]]],
    handle: IO[bytes],
    progress: _Progress,
    close: bool,
) -> int:
    try:
        return await _generate(cfg, client, jobs, handle, progress)
    finally:
        if close:
            await client.aclose()
