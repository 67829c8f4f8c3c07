"""Teacher-forced scoring from a server: the shift self-check, the cache layout, and the
generated file's top-k rows mapped to a student's ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _serving import FaultServer, ServerThread
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kdistill.cache import topk_log_probs
from kdistill.config import ConfigError
from kdistill.serve.client import OpenAIClient, TopToken
from kdistill.serve.config import generate_config_from_dict
from kdistill.serve.generate import run_generate
from kdistill.serve.records import (
    completion_topk,
    example_ids,
    read_generated,
    sequence_topk,
)
from kdistill.serve.scoring import (
    MisalignedServerError,
    ScoringUnsupported,
    check_alignment,
    score_texts,
    topk_row,
    topk_rows,
)
from kdistill.serve.server import _top_dict
from kdistill.serve.tokens import TokenizerMismatch, TokenMap

TEXTS = ["Knowledge distillation trains a small student.", "1, 2, 3, 4, 5, 6"]


# llama-cpp-python 0.3.36's answer to a token-id prompt (measured): HTTP 500, not a 4xx
LLAMACPP_IDS_REJECTED = (
    "4 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str'), 'msg': "
    "'Input should be a valid string', 'input': [16, 28, 30]}\n"
)


def shifting_app(teacher: Any, llamacpp: bool = False) -> FastAPI:
    """A /v1/completions that echoes prompt rows one position late, as llama.cpp's server:
    the row of token t is the distribution predicting token t + 1. ``llamacpp``: also as
    llama-cpp-python 0.3.36 — a token-id prompt gets its HTTP 500 validation error, and the
    echo has no row at position 0 (the distribution predicting token 1 is never sent)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(req: dict[str, Any]) -> Any:
        if llamacpp and not isinstance(req["prompt"], str):
            error = {"message": LLAMACPP_IDS_REJECTED, "type": "internal_server_error"}
            return JSONResponse({"error": error}, status_code=500)
        ids = teacher.encode(req["prompt"]) if isinstance(req["prompt"], str) else req["prompt"]
        k = int(req.get("logprobs") or 1)
        scored = teacher.score([[*ids, 0]], k)[0]  # rows 1..T: predicting ids[1:] and beyond
        rows = [(scored.top_ids[t + 1], scored.top_values[t + 1]) for t in range(len(ids))]
        if not req.get("echo"):
            top, values = rows[-1]  # greedy: the token after the prompt
            tokens, lps, tops = (
                [top[0]],
                [values[0]],
                [_top_dict(teacher, top, values, top[0], values[0], False)],
            )
        else:
            tokens = list(ids)
            tops = [_top_dict(teacher, top, values, -1, None, False) for top, values in rows]
            lps = [
                dict(zip(top, values, strict=True)).get(tok)
                for tok, (top, values) in zip(ids, rows, strict=True)
            ]
            if llamacpp:
                tops[0] = lps[0] = None
        return {"choices": [{"index": 0, "text": teacher.decode(tokens), "finish_reason": "length",
                             "logprobs": {"tokens": [teacher.texts[t] for t in tokens],
                                          "token_logprobs": lps, "top_logprobs": tops}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 0}}  # fmt: skip

    return app


def _run(url: str, coro: Any) -> Any:
    async def go() -> Any:
        async with OpenAIClient(url, backoff=0.01, max_retries=1) as client:
            return await coro(client)

    return asyncio.run(go())


def test_self_check_passes_kdistill_serve(served: Any) -> None:
    assert _run(served.url, lambda c: check_alignment(c, "tiny")) == "aligned"


def test_self_check_catches_a_server_that_shifts_echo_rows(teacher: Any) -> None:
    with ServerThread(shifting_app(teacher)) as server:
        assert _run(server.url, lambda c: check_alignment(c, "tiny")) == "shifted"
        with pytest.raises(MisalignedServerError, match="shifted by one position"):
            _run(server.url, lambda c: score_texts(c, "tiny", TEXTS, 4))
        with pytest.warns(UserWarning, match="correcting"):
            fixed = _run(server.url, lambda c: score_texts(c, "tiny", TEXTS, 4, on_shift="correct"))
    for text, scored in zip(TEXTS, fixed, strict=True):  # corrected rows = the model's true rows
        ids = teacher.encode(text)
        truth = teacher.score([ids], 4)[0]
        assert scored.corrected and len(scored.tokens) == len(ids)
        for t in range(1, len(ids)):
            got = {e.token: e.logprob for e in scored.tokens[t].top}
            for i, v in zip(truth.top_ids[t], truth.top_values[t], strict=True):
                if teacher.texts.count(teacher.texts[i]) == 1:
                    assert got[teacher.texts[i]] == pytest.approx(v, abs=1e-4)


def test_server_that_cannot_score_points_to_generate() -> None:
    with FaultServer() as server, pytest.raises(ScoringUnsupported, match="kdistill generate"):
        _run(server.url, lambda c: score_texts(c, "fake", ["some text"], 4))


@pytest.mark.parametrize("as_ids", [True, False])
def test_scored_rows_in_cache_layout_equal_the_models_topk(
    served: Any, teacher: Any, as_ids: bool
) -> None:
    k = 5
    inputs = [teacher.encode(t) for t in TEXTS] if as_ids else TEXTS
    scored = _run(served.url, lambda c: score_texts(c, "tiny", inputs, k))
    token_map = TokenMap.from_tokenizer(teacher.tokenizer)
    for text, s in zip(TEXTS, scored, strict=True):
        ids = teacher.encode(text)
        values, indices, rest, got_ids = topk_rows(s, k, token_map)
        assert got_ids == ids
        with torch.no_grad():
            logits = teacher.model(torch.tensor([ids])).logits[0]  # (T, V): row t predicts t+1
        ref_v, ref_i, ref_r = topk_log_probs(logits, k)
        n = len(ids) - 1  # the last row predicts past the text: a placeholder
        torch.testing.assert_close(values[:n], ref_v[:n].float(), atol=1e-4, rtol=0)
        assert torch.equal(indices[:n], ref_i[:n])
        torch.testing.assert_close(rest[:n], ref_r[:n].float(), atol=1e-3, rtol=0)


def test_generated_topk_lines_up_with_a_teacher_forced_forward(
    served: Any, teacher: Any, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["Define the word tree.", "1, 2, 3"]) + "\n"
    )
    cfg = generate_config_from_dict({
        "teacher": {"endpoint": served.url, "model": "tiny", "api": "chat"},
        "prompts": {"file": str(prompts)},
        "sampling": {"n": 1, "max_tokens": 6, "temperature": 0.0, "logprobs": 4},
        "output": str(tmp_path / "gen.jsonl"), "progress": "off",
    })  # fmt: skip
    run_generate(cfg)
    header, examples = read_generated(cfg.output_path)
    token_map = TokenMap.from_tokenizer(teacher.tokenizer)
    for example in examples:
        prompt_ids, completion_ids = example_ids(example, header, teacher.tokenizer, token_map)
        values, indices, rest = completion_topk(example, token_map, 4)
        seq = prompt_ids + completion_ids
        packed = sequence_topk(len(prompt_ids), (values, indices, rest), len(seq))
        assert packed.shape == (len(seq), 9)
        with torch.no_grad():
            logits = teacher.model(torch.tensor([seq])).logits[0]  # (L, V)
        ref_v, ref_i, _ = topk_log_probs(logits, 4)
        rows = slice(len(prompt_ids) - 1, len(seq) - 1)  # row P-1+j predicts completion token j
        torch.testing.assert_close(packed[rows, :4], ref_v[rows].float(), atol=1e-3, rtol=0)
        assert torch.equal(packed[rows, 4:8].long(), ref_i[rows])


def test_a_different_student_tokenizer_is_an_error_not_a_skip(
    served: Any, teacher: Any, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Define the word tree.\n")
    cfg = generate_config_from_dict({
        "teacher": {"endpoint": served.url, "model": "tiny"}, "prompts": {"file": str(prompts)},
        "sampling": {"max_tokens": 4, "logprobs": 3}, "output": str(tmp_path / "g.jsonl"),
        "progress": "off",
    })  # fmt: skip
    run_generate(cfg)
    _, (example,) = read_generated(cfg.output_path)
    other = TokenMap.from_table([bytes([b]) for b in range(256)])  # a byte-level student
    with pytest.raises(ConfigError, match="tokenizers differ"):
        completion_topk(example, other, 3)


def test_an_unspelt_alternative_goes_to_the_rest_bucket_not_an_error() -> None:
    """llama.cpp names a special token among the top-k as ``''`` with ``bytes: null``: its
    mass stays in the rest bucket; a token that is spelt but unknown is still an error."""
    table = [b"a", b"b", b"c", b"<|im_end|>"]
    token_map = TokenMap.from_table(table)
    a, b = TopToken("a", -0.5, None), TopToken("b", -1.5, None)
    special = TopToken("", -2.0, None)
    values, indices, rest, left_out = topk_row((a, special, b), 2, token_map)
    assert left_out == 1
    assert indices.tolist() == [0, 1]
    torch.testing.assert_close(values, torch.tensor([-0.5, -1.5]))
    mass_outside = 1 - torch.tensor([-0.5, -1.5]).exp().sum()  # includes the special's e^-2
    torch.testing.assert_close(rest, mass_outside.log())
    with pytest.raises(TokenizerMismatch, match="'zz'"):
        topk_row((a, TopToken("zz", -2.0, None)), 2, token_map)
    with pytest.raises(TokenizerMismatch):  # empty text with bytes is a (wrong) token, not unspelt
        topk_row((a, TopToken("", -2.0, [0xE2])), 2, token_map)
