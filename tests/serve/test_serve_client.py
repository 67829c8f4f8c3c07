"""OpenAIClient against a fault-injecting loopback server: what is retried, what is not."""

from __future__ import annotations

import asyncio
import time

import pytest
from _serving import FaultServer

from kdistill.config import ConfigError
from kdistill.serve.client import (
    EndpointRejected,
    EndpointUnavailable,
    OpenAIClient,
    parse_choices,
    parse_retry_after,
)

KEY = "sk-test-SECRET-123"


def _chat(server: FaultServer, **kwargs: object) -> object:
    async def go() -> object:
        async with OpenAIClient(
            server.url, api_key=KEY, api_key_env="TEACHER_KEY", backoff=0.01, **kwargs
        ) as client:
            payload = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                       "logprobs": True, "top_logprobs": 2}  # fmt: skip
            choices, _ = await client.chat(payload)
            return choices, client

    return asyncio.run(go())


def test_429_waits_for_retry_after_then_succeeds() -> None:
    with FaultServer([("status", 429, {"Retry-After": "0.3"})]) as server:
        (choices, client) = _chat(server)
    assert choices[0].text == "echo hi #0"
    first, second = server.requests[0][0], server.requests[1][0]
    assert second - first >= 0.28  # honoured, not the 0.01 s backoff
    assert client.retries == 1


def test_500s_are_retried_with_backoff() -> None:
    with FaultServer([("status", 500, {}), ("status", 503, {}), ("status", 502, {})]) as server:
        (choices, client) = _chat(server)
    assert len(server.requests) == 4 and client.retries == 3
    assert choices[0].tokens is not None and choices[0].tokens[1].top[0].bytes == list(b" hi")


def test_5xx_forever_gives_up_with_the_last_error_and_no_key() -> None:
    with (
        FaultServer([("status", 500, {})] * 10) as server,
        pytest.raises(EndpointUnavailable) as err,
    ):
        _chat(server, max_retries=2)
    assert len(server.requests) == 3
    assert "failed 3 times" in str(err.value) and "HTTP 500" in str(err.value)
    assert KEY not in str(err.value)


def test_slow_server_times_out_and_is_retried() -> None:
    with FaultServer([("sleep", 1.5)]) as server:
        start = time.monotonic()
        (choices, client) = _chat(server, timeout=0.3)
    assert choices[0].text == "echo hi #0" and client.retries == 1
    assert time.monotonic() - start < 1.4  # did not wait for the slow answer


def test_slow_server_past_every_timeout_names_the_timeout() -> None:
    with (
        FaultServer([("sleep", 1.0)] * 3) as server,
        pytest.raises(EndpointUnavailable, match=r"timed out after 0\.2 s"),
    ):
        _chat(server, timeout=0.2, max_retries=1)


@pytest.mark.parametrize("fault", ["malformed", "truncate", "no_choices"])
def test_broken_bodies_are_retried(fault: str) -> None:
    with FaultServer([(fault,), (fault,)]) as server:
        (choices, client) = _chat(server)
    assert choices[0].text == "echo hi #0" and client.retries == 2


@pytest.mark.parametrize("fault", ["malformed", "truncate"])
def test_broken_bodies_forever_end_in_a_clear_message(fault: str) -> None:
    with FaultServer([(fault,)] * 5) as server, pytest.raises(EndpointUnavailable) as err:
        _chat(server, max_retries=1)
    message = str(err.value)
    assert (
        ("malformed JSON" in message)
        if fault == "malformed"
        else ("RemoteProtocolError" in message or "incomplete" in message.lower())
    )


def test_401_is_not_retried_and_names_the_env_var() -> None:
    with FaultServer([("status", 401, {})]) as server, pytest.raises(EndpointRejected) as err:
        _chat(server)
    assert len(server.requests) == 1
    assert "TEACHER_KEY" in str(err.value) and KEY not in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI prints one line, exit 2


def test_404_is_not_retried_and_names_the_model_and_the_served_ones() -> None:
    with FaultServer([("status", 404, {})]) as server, pytest.raises(EndpointRejected) as err:
        _chat(server)
    assert len(server.requests) == 1
    assert "'fake'" in str(err.value) and "the server lists: fake" in str(err.value)


def test_400_is_not_retried() -> None:
    with (
        FaultServer([("status", 400, {})]) as server,
        pytest.raises(EndpointRejected, match="injected 400"),
    ):
        _chat(server)
    assert len(server.requests) == 1


def test_a_500_whose_body_is_a_validation_error_is_a_rejection_not_an_outage() -> None:
    """llama-cpp-python's server answers a request its schema rejects (e.g. a token-id
    prompt) with HTTP 500 and pydantic's message: retrying cannot help, and calling it an
    outage ("check that the server is up") would misname the cause."""
    body = (
        "4 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str'), "
        "'msg': 'Input should be a valid string', 'input': [16, 28, 30]}"
    )
    with (
        FaultServer([("status", 500, {}, body)]) as server,
        pytest.raises(EndpointRejected, match="rejected the request as invalid") as err,
    ):
        _chat(server)
    assert len(server.requests) == 1 and "Input should be a valid string" in str(err.value)
    assert "server is up" not in str(err.value) and isinstance(err.value, ConfigError)


def test_the_key_is_sent_only_in_the_authorization_header() -> None:
    with FaultServer() as server:
        (_, client) = _chat(server)
    headers = {k.lower(): v for k, v in server.requests[0][2].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(client) and KEY not in str(server.requests[0][3])


def test_concurrency_is_bounded() -> None:
    async def go(server: FaultServer) -> None:
        async with OpenAIClient(server.url, concurrency=3) as client:
            payload = {"model": "fake", "prompt": "p", "max_tokens": 1}
            await asyncio.gather(*[client.completions(payload) for _ in range(9)])

    with FaultServer(delay=0.2) as server:
        start = time.monotonic()
        asyncio.run(go(server))
        elapsed = time.monotonic() - start
    times = sorted(t for t, *_ in server.requests)
    assert 0.55 <= elapsed < 1.5  # three waves of three
    assert times[3] - times[0] >= 0.18  # the 4th waited for a slot


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(
        10.0
    )
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after("soon") is None


def test_parse_completions_logprobs_and_token_ids() -> None:
    body = {"choices": [{"index": 0, "text": "ab", "finish_reason": "length", "logprobs": {
        "tokens": ["token_id:5", "token_id:7"], "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"token_id:7": -0.5, "token_id:2": -1.0}]}}]}  # fmt: skip
    (choice,) = parse_choices(body, chat=False)
    assert choice.tokens is not None
    assert [t.id for t in choice.tokens] == [5, 7]
    assert [(t.id, t.logprob) for t in choice.tokens[1].top] == [(7, -0.5), (2, -1.0)]
    with pytest.raises(ValueError, match="choices"):
        parse_choices({"error": "x"}, chat=True)
