"""`kdistill lm` on a served teacher: training on a `kdistill generate` file written by the
real `kdistill serve` (prompt masked, the top-k KD term by hand, another tokenizer refused),
and the token_kd top-k cache scored by a server (equal to the local cache; a shifting server
refused). Servers bind 127.0.0.1 and are stopped by each test."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _serving import CHAT_TEMPLATE, CORPUS, FaultServer, ServerThread
from test_serve_scoring import shifting_app

from kdistill.cache import build_cache, open_cache
from kdistill.cli import main
from kdistill.config import ConfigError
from kdistill.lm.batches import pad_right
from kdistill.lm.config import lm_config_from_dict
from kdistill.lm.train import build_lm_run
from kdistill.serve.config import generate_config_from_dict
from kdistill.serve.generate import run_generate
from kdistill.serve.server import build_app
from kdistill.serve.tokens import TokenMap

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
PROMPTS = [
    "Define the word tree.",
    "What is a fox?",
    "Count: 1, 2, 3",
    "Write a Python function.",
    "What does a teacher do?",
    "Say hello.",
    "Name a colour.",
    "What is distillation?",
    "Give a number.",
    "Describe a dog.",
]
K = 4  # top-k log-probabilities per generated token
STUDENT = {
    "arch": "llama",
    "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 128},
}  # fmt: skip
TRAIN = {"epochs": 1, "threads": 1, "progress": False, "tensorboard": False}


@pytest.fixture(scope="module")
def server(teacher: Any) -> Iterator[ServerThread]:
    with ServerThread(build_app(teacher, batch_wait_ms=5)) as running:
        yield running


@pytest.fixture(scope="module")
def generated(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat file written by `kdistill generate` against `kdistill serve` (top-4 logprobs)."""
    folder = tmp_path_factory.mktemp("generated")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = generate_config_from_dict({
        "teacher": {"endpoint": server.url, "model": "tiny", "api": "chat", "concurrency": 4},
        "prompts": {"file": str(prompts)},
        "sampling": {"n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 0, "logprobs": K,
                     "system_prompt": "Be brief."},
        "output": str(folder / "gen.jsonl"), "progress": "off",
    })  # fmt: skip
    run_generate(cfg)
    return cfg.output_path


def _seqkd_config(file: Path, tokenizer: Path, out: Path, **distill: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {"generated_file": str(file), "tokenizer": str(tokenizer), "max_length": 64,
                 "batch_size": 4, "eval_fraction": 0.2},
        "student": STUDENT,
        "distill": {"objective": "seqkd", "alpha": 0.5, **distill},
        "train": TRAIN,
    }  # fmt: skip


def _records(file: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    return lines[0], [r for r in lines[1:] if r["kind"] == "completion"]


def _sequences(file: Path, tokenizer: Any) -> dict[tuple[int, ...], tuple[int, dict[str, Any]]]:
    """Expected training sequence → (prompt length, record), built here from the raw JSON: the
    chat template of system + user, then the teacher's token ids, then EOS if it stopped."""
    header, records = _records(file)
    out = {}
    for record in records:
        messages = [{"role": "system", "content": header["settings"]["system_prompt"]},
                    {"role": "user", "content": record["prompt"]}]  # fmt: skip
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        completion = [t["id"] for t in record["tokens"]]
        if record["finish_reason"] == "stop":
            completion.append(tokenizer.eos_token_id)
        out[tuple(prompt + completion)] = (len(prompt), record)
    return out


def test_generated_file_trains_on_completions_with_the_kd_term_by_hand(
    generated: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = lm_config_from_dict(_seqkd_config(generated, tiny_model_dir, tmp_path / "run"))
    run = build_lm_run(cfg)
    assert run.teacher is None and run.distiller.teacher is None  # no local teacher at all
    assert [t.name for t in run.distiller.terms] == ["kd", "ce"]
    info = run.info["generated"]
    assert info["topk"] == K and info["prompts"] == len(PROMPTS)
    assert info["train_examples"] + info["eval_examples"] == 2 * len(PROMPTS)
    expected = _sequences(generated, run.tokenizer)

    batch = next(iter(run.train_loader))
    ids, labels = batch["inputs"]["input_ids"], batch["target"]  # (B, T)
    lengths = batch["inputs"]["attention_mask"].sum(1).tolist()
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        output.logits.retain_grad()
        captured.append(output.logits)

    hook = run.student.register_forward_hook(keep)
    out = run.distiller(batch["inputs"], labels, {"topk": batch["teacher.topk"]})
    hook.remove()
    out["loss"].backward()
    logits, grad = captured[0].detach().double(), captured[0].grad  # (B, T, V)

    kd_terms, ce_terms = [], []
    for b, n in enumerate(lengths):
        prompt_length, record = expected[tuple(ids[b, :n].tolist())]
        # prompt tokens carry no loss: no label before P - 1, no gradient there
        assert (labels[b, : prompt_length - 1] == -100).all()
        assert grad[b, : prompt_length - 1].abs().max() == 0
        assert grad[b, prompt_length - 1].abs().max() > 0  # predicts completion token 0
        assert (labels[b, n - 1 :] == -100).all() and grad[b, n - 1 :].abs().max() == 0
        targets = ids[b, prompt_length:n]
        assert torch.equal(labels[b, prompt_length - 1 : n - 1], targets)
        log_q = torch.log_softmax(logits[b], dim=-1)  # (T, V)
        ce_terms += [-log_q[prompt_length - 1 + j, t].item() for j, t in enumerate(targets)]
        for j, token in enumerate(record["tokens"]):  # the appended EOS has no teacher row
            row = log_q[prompt_length - 1 + j]
            top = sorted(token["top_logprobs"], key=lambda e: -e["logprob"])[:K]
            p = [math.exp(e["logprob"]) for e in top]
            q = [math.exp(row[e["id"]].item()) for e in top]
            rest_p, rest_q = 1 - sum(p), 1 - sum(q)
            kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            kd_terms.append(kl + rest_p * math.log(rest_p / rest_q))
    assert out["kd_loss"].item() == pytest.approx(sum(kd_terms) / len(kd_terms), rel=1e-5)
    assert out["ce_loss"].item() == pytest.approx(sum(ce_terms) / len(ce_terms), rel=1e-5)


def test_cli_trains_the_generated_seqkd_example(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    args = ["lm", str(EXAMPLES / "generated_seqkd.yaml")]
    for item in (f"output_dir={out}", f"data.generated_file={EXAMPLES / 'generated_tiny.jsonl'}",
                 f"data.tokenizer={EXAMPLES / 'tiny_bpe'}"):  # fmt: skip
        args += ["--set", item]
    assert main(args) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"] is None and summary["generated"]["topk"] == 4
    assert summary["student"]["final"]["loss"] < summary["student"]["initial"]["loss"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kd_loss", "train_ce_loss"} <= set(row)


def test_generated_file_without_topk_needs_alpha_zero(generated: Path, tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    header, records = _records(generated)
    header["settings"]["logprobs"] = 0
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps(r) + "\n" for r in [header] + [
        {**r, "tokens": None} for r in records]))  # fmt: skip
    cfg = lm_config_from_dict(_seqkd_config(bare, tiny_model_dir, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"distill\.alpha: .*has none"):
        build_lm_run(cfg)
    cfg = lm_config_from_dict(_seqkd_config(bare, tiny_model_dir, tmp_path / "b", alpha=0.0))
    run = build_lm_run(cfg)
    assert [t.name for t in run.distiller.terms] == ["ce"] and run.info["generated"]["topk"] is None
    with pytest.raises(ConfigError, match=r"distill\.alpha: .*generated_topk: false"):
        lm_config_from_dict(
            _seqkd_config(bare, tiny_model_dir, tmp_path / "c")
            | {"data": {"generated_file": str(bare), "generated_topk": False}}
        )


def _other_tokenizer(folder: Path) -> None:
    """A byte-level BPE of another vocabulary (other merges, other ids) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line[::-1] for line in CORPUS] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def test_a_student_with_another_tokenizer_is_an_error_with_topk(
    generated: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-tokenizer"
    _other_tokenizer(other)
    cfg = lm_config_from_dict(_seqkd_config(generated, other, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"data\.generated_file line \d+: .*tokenizers differ"):
        build_lm_run(cfg)
    # sequence-level KD alone reads the completion text: any tokenizer will do
    data = _seqkd_config(generated, other, tmp_path / "b", alpha=0.0)
    data["data"]["max_length"] = 256  # its merges were learnt on reversed text: long prompts
    assert build_lm_run(lm_config_from_dict(data)).info["generated"]["train_examples"] > 0


def _token_kd_config(texts: Path, tokenizer: Path, out: Path, url: str, **served: Any) -> dict:
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {"text_file": str(texts), "tokenizer": str(tokenizer), "max_length": 32,
                 "batch_size": 4, "eval_fraction": 0.2},
        "student": STUDENT,
        "distill": {"objective": "token_kd", "alpha": 0.5, "cache_dir": str(out / "cache"),
                    "cache_topk": 8, "cache_dtype": "float32",
                    "teacher": {"endpoint": url, "model": "tiny", "concurrency": 4,
                                "max_retries": 0, "timeout": 30, **served}},
        "train": TRAIN,
    }  # fmt: skip


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(CORPUS + PROMPTS) + "\n")
    return path


def _assert_cache_is_the_local_teachers(
    run: Any, cfg: Any, out: Path, teacher: Any, tmp_path: Path, text_named: bool = False
) -> None:
    """The server-scored top-k cache in ``out / "cache"`` equals the local teacher's own
    top-k of the same texts (ids, values, rest mass) on every row that predicts a token.
    ``text_named``: the server named its alternatives by text only (llama.cpp), so a partial
    UTF-8 byte that several ids spell cannot be placed (its mass stays in the rest bucket):
    each row holds the local top-k without those ids, with the same values."""
    served = open_cache(out / "cache")
    assert served.manifest["teacher"] == cfg.distill.teacher.identity()
    examples = sorted(run.train_loader.examples, key=lambda x: x["row"])
    inputs, mask = pad_right([x["input_ids"] for x in examples], run.tokenizer.pad_token_id)
    local = build_cache(
        tmp_path / "local", teacher.model, inputs, data_name=served.manifest["data"]["name"],
        transform=served.manifest["data"]["transform"], k=8, attention_mask=mask,
        values_dtype=torch.float32,
    )  # fmt: skip
    assert local.manifest["data"] == served.manifest["data"]  # the same texts, token for token
    rows = torch.zeros_like(mask, dtype=torch.bool)  # (N, T): rows that predict a real token
    rows[:, :-1] = mask[:, 1:].bool()
    values = {name: (c["topk_values"].to_tensor(), c["topk_indices"].to_tensor(),
                     c["rest_log_mass"].to_tensor()) for name, c in (("s", served), ("l", local))}  # fmt: skip
    (sv, si, sr), (lv, li, lr) = values["s"], values["l"]
    if text_named:  # per row: the served entries are the local top-k minus the unplaceable
        by_text = TokenMap.from_tokenizer(run.tokenizer).by_text
        placeable = {i for i in by_text.values() if i >= 0}
        compared = 0
        for n, t in rows.nonzero().tolist():
            local_row = [(int(i), float(v)) for i, v in zip(li[n, t], lv[n, t], strict=True)]
            want = [(i, v) for i, v in local_row if i in placeable]
            got = [(int(i), float(v)) for i, v in zip(si[n, t], sv[n, t], strict=True)]
            got = [(i, v) for i, v in got if v != -math.inf]
            assert [i for i, _ in got] == [i for i, _ in want], (n, t)
            torch.testing.assert_close([v for _, v in got], [v for _, v in want], atol=1e-5, rtol=0)
            compared += len(got)
        assert compared > rows.sum() * 4  # of 8 per row: most entries are placeable
        return
    assert torch.equal(si[rows].long(), li[rows].long())
    torch.testing.assert_close(sv[rows], lv[rows], atol=1e-5, rtol=0)
    # the server sends top-k only: rest = log(1 − Σ top-k) vs the local logsumexp of the rest
    torch.testing.assert_close(sr[rows].exp(), lr[rows].exp(), atol=1e-5, rtol=0)
    print(f"max |Δ value| {(sv[rows] - lv[rows]).abs().max():.2e}, max |Δ rest mass| "
          f"{(sr[rows].exp() - lr[rows].exp()).abs().max():.2e}")  # fmt: skip


def test_server_scored_cache_equals_the_local_teachers_cache(
    server: ServerThread,
    teacher: Any,
    texts: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    cfg = lm_config_from_dict(_token_kd_config(texts, tiny_model_dir, out, server.url))
    run = build_lm_run(cfg)
    assert run.info["teacher_cache"]["built"] and run.distiller.teacher is None
    _assert_cache_is_the_local_teachers(run, cfg, out, teacher, tmp_path)

    # an existing cache is reused without asking the server; another server's is stale
    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server was asked again")

    monkeypatch.setattr("kdistill.serve.scoring.score_texts_sync", no_server)
    assert build_lm_run(cfg).info["teacher_cache"]["built"] is False
    cfg = lm_config_from_dict(_token_kd_config(texts, tiny_model_dir, out, "http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigError, match=r"distill\.cache_dir: .* stale: .*teacher server"):
        build_lm_run(cfg)


def test_a_server_that_rejects_token_ids_scores_the_texts_as_strings(
    teacher: Any, texts: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """llama.cpp's server: token-id prompts get an HTTP 500 validation error (not retried,
    not an outage), echo rows come one position late and position 0 has none. With
    ``on_shift: correct`` the texts go out as strings (special tokens spelt), the rows are
    moved back, the missing one asked for by generating after the first token, every token
    checked against the student's ids: the local teacher's own cache."""
    out = tmp_path / "run"
    with ServerThread(shifting_app(teacher, llamacpp=True)) as server:
        cfg = lm_config_from_dict(
            _token_kd_config(texts, tiny_model_dir, out, server.url, on_shift="correct")
        )
        with pytest.warns(UserWarning, match="rejects token-id prompts") as caught:
            run = build_lm_run(cfg)
    assert any("correcting" in str(w.message) for w in caught)
    _assert_cache_is_the_local_teachers(run, cfg, out, teacher, tmp_path, text_named=True)


def test_a_shifting_or_non_scoring_server_is_refused(
    teacher: Any, texts: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with ServerThread(shifting_app(teacher)) as shifting:
        cfg = lm_config_from_dict(
            _token_kd_config(texts, tiny_model_dir, tmp_path / "a", shifting.url)
        )
        with pytest.raises(ConfigError, match=r"^distill\.teacher: .*shifted by one position"):
            build_lm_run(cfg)
    with FaultServer() as fake:
        cfg = lm_config_from_dict(_token_kd_config(texts, tiny_model_dir, tmp_path / "b", fake.url))
        with pytest.raises(ConfigError, match=r"^distill\.teacher: .*kdistill generate"):
            build_lm_run(cfg)
    assert not (tmp_path / "a" / "cache" / "manifest.json").exists()


def test_cli_names_a_shifted_server_that_takes_no_ids_in_one_line(
    teacher: Any, texts: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``kdistill lm`` against a llama.cpp-like server with ``on_shift: refuse``: one line
    naming the shift and the key that corrects it, exit 2, no cache written."""
    import yaml

    out = tmp_path / "run"
    with ServerThread(shifting_app(teacher, llamacpp=True)) as server:
        config = tmp_path / "served.yaml"
        config.write_text(yaml.safe_dump(_token_kd_config(texts, tiny_model_dir, out, server.url)))
        assert main(["lm", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shifted by one position" in err[0], err
    assert "distill.teacher.on_shift: correct" in err[0] and "Traceback" not in err[0]
    assert not (out / "cache" / "manifest.json").exists()
