"""kdistill serve on loopback: routes, alignment of echoed logprobs, batching, errors."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _serving import free_port

from kdistill.serve.client import OpenAIClient

TEXT = "1, 2, 3, 4, 5, 6, 7, 8"


def _reference(teacher: Any, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens < t) from a plain forward: (T - 1, V), row t-1 for token t."""
    with torch.no_grad():
        logits = teacher.model(torch.tensor([ids])).logits[0]  # (T, V)
    return torch.log_softmax(logits.double(), -1)[:-1]


def test_models_lists_the_served_name(served: Any) -> None:
    body = httpx.get(served.url + "/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny"]


def test_echo_logprobs_are_aligned_with_the_token_they_score(served: Any, teacher: Any) -> None:
    body = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 3,
        "return_tokens_as_token_ids": True,  # unique keys: texts of partial UTF-8 tokens collide
    }).json()  # fmt: skip
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    ids = teacher.encode(TEXT)
    assert lp["token_ids"] == ids and choice["text"] == TEXT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _reference(teacher, ids)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        top_ids = ref[t - 1].topk(3).indices.tolist()
        row = lp["top_logprobs"][t]
        for i in top_ids:  # the row of position t is the distribution predicting token t
            assert row[f"token_id:{i}"] == pytest.approx(ref[t - 1, i].item(), abs=1e-4)


def test_prompt_logprobs_vllm_format_with_ids(served: Any, teacher: Any) -> None:
    ids = teacher.encode(TEXT)
    body = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0,
    }).json()  # fmt: skip
    rows = body["choices"][0]["prompt_logprobs"]
    ref = _reference(teacher, ids)
    assert rows[0] is None and len(rows) == len(ids)
    for t in range(1, len(ids)):
        row = rows[t]
        assert row[str(ids[t])]["logprob"] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        rank = int((ref[t - 1] > ref[t - 1, ids[t]]).sum()) + 1
        assert row[str(ids[t])]["rank"] == rank
        best = int(ref[t - 1].argmax())
        assert row[str(best)]["rank"] == 1


def test_greedy_completion_matches_hf_generate_and_its_logprobs(served: Any, teacher: Any) -> None:
    body = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": TEXT, "max_tokens": 5, "temperature": 0, "logprobs": 2,
    }).json()  # fmt: skip
    choice = body["choices"][0]
    ids = teacher.encode(TEXT)
    generated = choice["logprobs"]["token_ids"]
    seq = list(ids)
    for token in generated:  # greedy: each token is the argmax after the sequence so far
        ref = _reference(teacher, [*seq, token])[-1]
        assert token == int(ref.argmax())
        seq.append(token)
    assert choice["text"] == teacher.decode(generated)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                             "total_tokens": len(ids) + len(generated)}  # fmt: skip


def test_chat_logprobs_bytes_and_ids(served: Any, teacher: Any) -> None:
    body = httpx.post(served.url + "/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Define the word tree."}],
        "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3, "n": 2,
    }).json()  # fmt: skip
    assert len(body["choices"]) == 2
    first = body["choices"][0]
    content = first["logprobs"]["content"]
    assert (
        b"".join(bytes(c["bytes"]) for c in content).decode("utf-8", "replace")
        == first["message"]["content"]
    )
    for c in content:
        assert len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6  # greedy picks the top
        assert teacher.pieces[c["id"]] == bytes(c["bytes"])
    assert body["choices"][1]["message"] == first["message"]  # greedy twice: same text


def test_sampling_n_draws_different_samples(served: Any) -> None:
    body = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": "Define", "max_tokens": 8, "temperature": 5.0, "n": 6, "seed": 1,
    }).json()  # fmt: skip
    texts = [c["text"] for c in body["choices"]]
    assert len(texts) == 6 and len(set(texts)) > 1


def test_stop_string_cuts_the_text(served: Any) -> None:
    full = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": TEXT, "max_tokens": 8, "temperature": 0}).json()  # fmt: skip
    text = full["choices"][0]["text"]
    stop = text[2:4]
    cut = httpx.post(served.url + "/completions", json={
        "model": "tiny", "prompt": TEXT, "max_tokens": 8, "temperature": 0, "stop": [stop]}).json()  # fmt: skip
    choice = cut["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"


def test_unknown_model_is_404_and_bad_request_is_400(served: Any) -> None:
    r = httpx.post(served.url + "/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/completions", json={"model": "tiny"})
    assert r.status_code == 400
    r = httpx.post(
        served.url + "/completions", json={"model": "tiny", "prompt": "x", "logprobs": 500}
    )
    assert r.status_code == 400


def test_concurrent_requests_are_batched_and_match_single_ones(served: Any, teacher: Any) -> None:
    texts = [TEXT, "Define the word tree.", "def f(x): return x", "héllo wörld"]

    async def go(prompts: list[str]) -> list[Any]:
        async with OpenAIClient(served.url, concurrency=8) as client:
            return await asyncio.gather(*[
                client.completions({"model": "tiny", "prompt": p, "max_tokens": 0, "echo": True,
                                    "logprobs": 1}) for p in prompts
            ])  # fmt: skip

    single = [asyncio.run(go([t]))[0] for t in texts]
    before = httpx.get(served.url.removesuffix("/v1") + "/kdistill/stats").json()["batches"]
    together = asyncio.run(go(texts * 2))
    stats = httpx.get(served.url.removesuffix("/v1") + "/kdistill/stats").json()
    assert stats["max_batch"] > 1 and stats["batches"] - before < len(texts) * 2
    for (one, _), (batched, _) in zip(single * 2, together, strict=True):
        a = [t.logprob for t in one[0].tokens[1:]]
        b = [t.logprob for t in batched[0].tokens[1:]]
        assert a == pytest.approx(b, abs=1e-4)  # right padding changes nothing


def test_kdistill_serve_cli_end_to_end(tiny_model_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdistill", "serve", str(tiny_model_dir), "--port", str(port),
         "--name", "t", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "kdistill serve did not start"
            time.sleep(0.2)

        async def go() -> Any:
            async with OpenAIClient(url) as client:
                return await client.chat({"model": "t", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                    "top_logprobs": 2})  # fmt: skip

        choices, body = asyncio.run(go())
        assert (
            choices[0].tokens is not None
            and len(choices[0].tokens) == body["usage"]["completion_tokens"]
        )
        assert all(math.isfinite(t.logprob) for t in choices[0].tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_batch_collects_requests_until_the_server_is_idle() -> None:
    """Requests 20 ms apart join one batch although they span well past the 100 ms gap
    (a window counted from the first request split them); a response leaving or a request
    starting (``touch``, the middleware's call) keeps the batch open too; a longer idle gap
    starts the next batch; max_batch closes a batch at once; after a batch of N requests the
    next waits for N (up to 10 % of that batch's run time) even across longer gaps."""
    from kdistill.serve.server import Batcher, ScoreItem, _Pending

    async def go(max_batch: int, events: list[tuple[str, float]], expect: int = 0) -> list[int]:
        batcher = Batcher(None, max_batch=max_batch, wait_ms=100)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        # as if a batch of `expect` requests that ran 4 s had just ended: patient for 0.4 s
        batcher.expect, batcher.last_seconds, batcher.finished_at = expect, 4.0, time.monotonic()

        async def feed() -> None:
            for kind, gap in events:
                await asyncio.sleep(gap)
                if kind == "touch":
                    batcher.touch()
                else:
                    await batcher.queue.put(_Pending(ScoreItem([1], 1), loop.create_future()))

        feeder = loop.create_task(feed())
        sizes: list[int] = []
        while sum(sizes) < sum(kind == "item" for kind, _ in events):
            sizes.append(len(await batcher._collect()))
        await feeder
        return sizes

    spaced = [("item", 0.0)] + [("item", 0.02)] * 9 + [("item", 0.4)]  # 10 over 180 ms, 1
    assert asyncio.run(go(32, spaced)) == [10, 1]
    touched = [("item", 0.0), ("touch", 0.06), ("touch", 0.06), ("touch", 0.06), ("item", 0.06)]
    assert asyncio.run(go(32, touched)) == [2]  # 240 ms apart, never idle for 100 ms
    assert asyncio.run(go(32, [("item", 0.0), ("item", 0.3)])) == [1, 1]
    assert asyncio.run(go(4, [("item", 0.0)] * 10)) == [4, 4, 2]
    slow_burst = [("item", 0.0), ("item", 0.15), ("item", 0.15), ("item", 0.15)]  # gaps > 100 ms
    assert asyncio.run(go(32, slow_burst)) == [1, 1, 1, 1]
    assert asyncio.run(go(32, slow_burst, expect=3)) == [3, 1]  # waits for the 3 it answered
