"""An asynchronous client for OpenAI-compatible endpoints (vLLM, llama.cpp, hosted APIs).

:class:`OpenAIClient` posts to ``{base_url}/completions`` and ``{base_url}/chat/completions``
with :mod:`httpx`, at most ``concurrency`` requests at a time, each under a timeout.

Failures are sorted into two kinds:

* **retried** — a 429 or a 5xx status, a timeout, a dropped connection or a truncated body,
  a body that is not JSON or has no ``choices``: up to ``max_retries`` more attempts after a
  delay of ``Retry-After`` when the server sends one (seconds or an HTTP date), otherwise
  ``backoff · 2^attempt`` seconds (capped at ``max_backoff``, with "full jitter": a uniform
  draw in ``[delay/2, delay]``). When they are spent, :class:`EndpointUnavailable` names the
  URL, the number of attempts and the last error.
* **not retried** — any other 4xx, and a 5xx whose body is a request-validation error
  (llama-cpp-python's server answers a request its schema rejects with HTTP 500 and
  pydantic's message; retrying it would only misreport a bad request as an outage):
  :class:`EndpointRejected` (a
  :class:`~kdistill.config.ConfigError`, so the CLI prints one line and exits 2): 401/403
  names the environment variable of the key, 404 the model (and the models the server
  lists), others quote the server's message.

The API key travels only in the ``Authorization`` header; it is never part of a message, a
repr or a record.

Responses are normalised by :func:`parse_choices` into :class:`Choice` objects whose
``tokens`` hold, per generated token, its string, bytes (when the server gives them), id
(vLLM ``return_tokens_as_token_ids`` / ``kdistill serve``), log-probability and top-k
alternatives — from the chat format (``logprobs.content[i].top_logprobs``) and from the
legacy completions format (``logprobs.tokens`` / ``token_logprobs`` / ``top_logprobs``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kdistill.config import ConfigError

__all__ = [
    "Choice",
    "EndpointError",
    "EndpointRejected",
    "EndpointUnavailable",
    "OpenAIClient",
    "TokenLogprob",
    "TopToken",
    "parse_choices",
    "parse_retry_after",
    "sampling_payload",
]

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_MAX_BODY_IN_MESSAGE = 300


class EndpointError(Exception):
    """A request to the teacher's endpoint failed (base of the two kinds below)."""


class EndpointRejected(EndpointError, ConfigError):
    """The server refused the request with a 4xx status other than 429: not retried."""


class EndpointUnavailable(EndpointError, RuntimeError):
    """The server kept failing (5xx, 429, timeouts, broken bodies) after every retry."""


class _Retryable(Exception):
    """One failed attempt worth retrying; ``retry_after`` in seconds when the server set it."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class TopToken:
    """One alternative of a top-k row: the token's string, bytes, id and log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    id: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled (or echoed) token, its log-probability and the top-k row it came from."""

    token: str
    logprob: float | None
    bytes: list[int] | None = None
    id: int | None = None
    top: tuple[TopToken, ...] = ()


@dataclass
class Choice:
    """One completion of a response (``index`` among the ``n`` samples)."""

    index: int
    text: str
    finish_reason: str | None
    tokens: list[TokenLogprob] | None = None  # None when the server sent no logprobs
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. vLLM's prompt_logprobs


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:  # pragma: no cover - older Pythons
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _token_id(token: str, given: Any) -> int | None:
    if isinstance(given, int) and not isinstance(given, bool):
        return given
    match = _TOKEN_ID.match(token)
    return int(match.group(1)) if match else None


def _top_row(raw: Any) -> tuple[TopToken, ...]:
    """A top-k row from the chat list form or the completions dict form."""
    if raw is None:
        return ()
    if isinstance(raw, Mapping):  # completions: {token: logprob}
        return tuple(
            TopToken(token=t, logprob=float(lp), id=_token_id(t, None)) for t, lp in raw.items()
        )
    return tuple(
        TopToken(
            token=item["token"],
            logprob=float(item["logprob"]),
            bytes=item.get("bytes"),
            id=_token_id(item["token"], item.get("id", item.get("token_id"))),
        )
        for item in raw
    )


def _chat_tokens(logprobs: Mapping[str, Any]) -> list[TokenLogprob] | None:
    content = logprobs.get("content")
    if content is None:
        return None
    return [
        TokenLogprob(
            token=item["token"],
            logprob=None if item.get("logprob") is None else float(item["logprob"]),
            bytes=item.get("bytes"),
            id=_token_id(item["token"], item.get("id", item.get("token_id"))),
            top=_top_row(item.get("top_logprobs")),
        )
        for item in content
    ]


def _completion_tokens(logprobs: Mapping[str, Any]) -> list[TokenLogprob] | None:
    tokens = logprobs.get("tokens")
    if tokens is None:
        return None
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    ids = logprobs.get("token_ids") or [None] * len(tokens)  # kdistill serve adds them
    if not len(values) == len(tops) == len(tokens) == len(ids):
        raise ValueError(
            f"logprobs lists of different lengths: tokens {len(tokens)}, token_logprobs "
            f"{len(values)}, top_logprobs {len(tops)}"
        )
    return [
        TokenLogprob(
            token=token,
            logprob=None if lp is None else float(lp),
            id=_token_id(token, token_id),
            top=_top_row(top),
        )
        for token, lp, top, token_id in zip(tokens, values, tops, ids, strict=True)
    ]


def parse_choices(body: Mapping[str, Any], chat: bool) -> list[Choice]:
    """The choices of a completions / chat response; ``ValueError`` when malformed."""
    raw_choices = body.get("choices")
    if not isinstance(raw_choices, list):
        raise ValueError(f"no 'choices' list in the response (keys: {sorted(body)})")
    choices = []
    for position, raw in enumerate(raw_choices):
        if chat:
            message = raw.get("message") or {}
            text = message.get("content")
        else:
            text = raw.get("text")
        if not isinstance(text, str):
            raise ValueError(f"choice {position} has no text")
        logprobs = raw.get("logprobs")
        tokens = None
        if isinstance(logprobs, Mapping):
            tokens = _chat_tokens(logprobs) if chat else _completion_tokens(logprobs)
        extra = {k: raw[k] for k in ("prompt_logprobs",) if raw.get(k) is not None}
        choices.append(
            Choice(
                index=int(raw.get("index", position)),
                text=text,
                finish_reason=raw.get("finish_reason"),
                tokens=tokens,
                extra=extra,
            )
        )
    return choices


class OpenAIClient:
    """Bounded, retrying, async access to an OpenAI-compatible ``/v1`` endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (the paths below are appended to it).
        api_key: sent as ``Authorization: Bearer …``; ``None`` sends no header.
        api_key_env: the name of the environment variable the key came from — only used in
            the message of a 401/403.
        timeout: seconds for each attempt (connect, read, write, pool).
        max_retries: further attempts after a retryable failure.
        backoff / max_backoff: the first delay and the cap of the exponential backoff (s).
        concurrency: requests in flight at most.
        transport: an ``httpx`` transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_retry_after: float = 600.0,
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )
        self._slots = asyncio.Semaphore(concurrency)
        self.attempts = 0  # every HTTP attempt, retries included
        self.retries = 0

    def __repr__(self) -> str:  # never the key
        return f"OpenAIClient({self.base_url!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------- requests

    async def post(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``base_url + path``; the JSON body, after retries."""
        return await self._request("POST", path, payload)

    async def get(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path, None)

    async def models(self) -> list[str]:
        """The ids listed by ``GET /models``."""
        body = await self.get("/models")
        return [str(m.get("id")) for m in body.get("data", []) if isinstance(m, Mapping)]

    async def completions(self, payload: Mapping[str, Any]) -> tuple[list[Choice], dict[str, Any]]:
        """``POST /completions``: the parsed choices and the raw body."""
        body = await self._request("POST", "/completions", payload, chat=False)
        return parse_choices(body, chat=False), body

    async def chat(self, payload: Mapping[str, Any]) -> tuple[list[Choice], dict[str, Any]]:
        """``POST /chat/completions``: the parsed choices and the raw body."""
        body = await self._request("POST", "/chat/completions", payload, chat=True)
        return parse_choices(body, chat=True), body

    async def _request(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        chat: bool | None = None,
    ) -> dict[str, Any]:
        url = self.base_url + path
        last = ""
        async with self._slots:
            for attempt in range(self.max_retries + 1):
                self.attempts += 1
                try:
                    return await self._attempt(method, url, payload, chat)
                except _Retryable as err:
                    last = str(err)
                    if attempt == self.max_retries:
                        break
                    self.retries += 1
                    await asyncio.sleep(self._delay(attempt, err.retry_after))
        raise EndpointUnavailable(
            f"{method} {url} failed {self.max_retries + 1} times; last error: {last}. "
            "Check that the server is up (records already written are kept: re-run to "
            "continue), or raise teacher.timeout / teacher.max_retries"
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        return random.uniform(delay / 2, delay)

    async def _attempt(
        self, method: str, url: str, payload: Mapping[str, Any] | None, chat: bool | None
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(method, url, json=payload)
        except httpx.TimeoutException as err:
            raise _Retryable(f"timed out after {self.timeout:g} s ({type(err).__name__})") from None
        except httpx.TransportError as err:  # refused, reset, truncated body, protocol error
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        status = response.status_code
        if status >= 500 and _is_validation_error(response.text):
            raise EndpointRejected(
                f"HTTP {status} from {url}: the server rejected the request as invalid (its "
                "body is a request-validation error, not an outage; not retried). Server said: "
                f"{_snippet(response.text)}"
            )
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise _Retryable(f"HTTP {status}: {_snippet(response.text)}", retry_after)
        if status >= 400:
            raise await self._rejected(response, url, payload)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _Retryable(
                f"malformed JSON in the response ({err}): {_snippet(response.text)}"
            ) from None
        if not isinstance(body, dict):
            raise _Retryable(f"the response is not a JSON object: {_snippet(response.text)}")
        if chat is not None:
            try:
                parse_choices(body, chat)
            except (ValueError, KeyError, TypeError) as err:
                raise _Retryable(f"incomplete response: {err}") from None
        return body

    async def _rejected(
        self, response: httpx.Response, url: str, payload: Mapping[str, Any] | None
    ) -> EndpointRejected:
        status, detail = response.status_code, _snippet(response.text)
        if status in (401, 403):
            where = (
                f"the environment variable {self.api_key_env}"
                if self.api_key_env
                else "teacher.api_key_env (the name of an environment variable holding the key)"
            )
            return EndpointRejected(
                f"HTTP {status} from {url}: the server refused the API key; set a valid key in "
                f"{where}. Server said: {detail}"
            )
        if status == 404:
            model = (payload or {}).get("model")
            listed = ""
            try:
                names = await self.models()
                listed = f"; the server lists: {', '.join(names) or 'no models'}"
            except (EndpointError, httpx.HTTPError, ValueError, AttributeError):
                pass
            return EndpointRejected(
                f"HTTP 404 from {url}: unknown model {model!r} (teacher.model) or no such "
                f"endpoint (teacher.endpoint, teacher.api){listed}. Server said: {detail}"
            )
        return EndpointRejected(
            f"HTTP {status} from {url}: the server rejected the request (not retried); "
            f"check the sampling settings. Server said: {detail}"
        )


_VALIDATION = re.compile(
    r"validation error|Input should be|\(\s*'body'\s*,|\[\s*\"body\"\s*,|field required",
    re.IGNORECASE,
)


def _is_validation_error(text: str) -> bool:
    """A 5xx body that reports the *request* as invalid: pydantic / FastAPI validation
    messages ("Input should be a valid string", ``'loc': ('body', 'prompt')``), which
    llama-cpp-python's server wraps as HTTP 500. Retrying cannot help; it is a rejection."""
    return bool(_VALIDATION.search(text[:4000]))


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_BODY_IN_MESSAGE else text[:_MAX_BODY_IN_MESSAGE] + " …"


def sampling_payload(
    model: str,
    *,
    n: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    logprobs: int = 0,
    chat: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The common request fields; ``logprobs = k > 0`` asks for the top-k of each token."""
    payload: dict[str, Any] = {"model": model, "n": n}
    for key, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("max_tokens", max_tokens),
        ("seed", seed),
    ):
        if value is not None:
            payload[key] = value
    if stop:
        payload["stop"] = list(stop)
    if logprobs:
        if chat:
            payload["logprobs"], payload["top_logprobs"] = True, logprobs
        else:
            payload["logprobs"] = logprobs
    payload.update(extra or {})
    return payload
