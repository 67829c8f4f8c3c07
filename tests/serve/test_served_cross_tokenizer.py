"""`kdistill lm` distilling a served teacher with another tokenizer (``distill.teacher`` +
``distill.cross_tokenizer``): the server (the real `kdistill serve` on a tiny Llama with a
byte-level BPE) scores raw texts; the student reads UTF-8 bytes. The KD term equals the one
the local cross-tokenizer path computes from the same model's top-k over its own tokens;
the rows are kept in ``cache_dir``; mistakes are one-line errors. Servers bind 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _serving import CORPUS, ServerThread
from safetensors.torch import load_file
from test_serve_lm_integration import STUDENT
from test_serve_scoring import shifting_app

from kdistill.config import ConfigError
from kdistill.lm.config import lm_config_from_dict
from kdistill.lm.served_cross import ROWS_FILE
from kdistill.lm.train import build_lm_run, run_lm

K = 8
LINES = [
    *CORPUS,
    "Define the word tree: a tall plant with a trunk.",
    "for i in range(3): print(i)",
    "Ünïcödé and emoji 🤖 in one line, 1 2 3.",
    "The student learns the teacher's distribution over the next token.",
    "日本語のテキストとEnglish text.",
]


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def _config(texts: Path, out: Path, loss: str, **distill: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {"text_file": str(texts), "tokenizer": "byte", "max_length": 40,
                 "batch_size": 4, "eval_fraction": 0.2},
        "student": STUDENT,
        "distill": {"objective": "token_kd", "cross_tokenizer": loss, "alpha": 0.5,
                    "cache_dir": str(out / "cache"), "cache_topk": K, "cache_dtype": "float32",
                    **distill},
        "train": {"epochs": 1, "threads": 1, "progress": False, "tensorboard": False},
    }  # fmt: skip


def _served(url: str, tokenizer: Path, **extra: Any) -> dict[str, Any]:
    return {"endpoint": url, "model": "tiny", "tokenizer": str(tokenizer), "concurrency": 4,
            "max_retries": 0, "timeout": 30, **extra}  # fmt: skip


def _kd_term(run: Any) -> Any:
    return next(t for t in run.distiller.terms if t.name == "kd")


def _first_batch(run: Any) -> dict[str, Any]:
    run.train_loader.set_epoch(0)
    return next(iter(run.train_loader))


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_served_teacher_kd_equals_the_local_teachers_topk(
    served: ServerThread, tiny_model_dir: Path, texts: Path, tmp_path: Path, loss: str
) -> None:
    weights = {"matched_weight": 0.7, "unmatched_weight": 0.3} if loss == "hybrid" else {}
    served_cfg = _config(
        texts, tmp_path / "served", loss, teacher=_served(served.url, tiny_model_dir), **weights
    )
    run = build_lm_run(lm_config_from_dict(served_cfg))
    assert run.distiller.teacher is None and run.info["teacher_cache"]["built"]
    assert (tmp_path / "served" / "cache" / ROWS_FILE).is_file()
    info = run.info["cross_tokenizer"]
    assert info["student_tokenizer"] == "byte (260 ids)" and "served" in info["teacher_tokenizer"]
    assert info["teacher_only_texts"] > 0  # multi-byte BPE alternatives: ids past the bytes

    # the same model as a local teacher on its own tokenizer, its top-k cached on disk
    local_cfg = _config(texts, tmp_path / "local", loss, **weights)
    local_cfg["teacher"] = {"path": str(tiny_model_dir)}
    local = build_lm_run(lm_config_from_dict(local_cfg))

    batch, other = _first_batch(run), _first_batch(local)
    assert torch.equal(batch["inputs"]["input_ids"], other["inputs"]["input_ids"])  # same rows
    assert torch.equal(batch["target"], other["target"])
    a, b = batch["alignment"], other["alignment"]
    for row in range(len(a["mask"])):
        served_groups = list(
            zip(a["student_positions"][row][a["mask"][row]].tolist(),
                (a["teacher_positions"][row][a["mask"][row]] - 1).tolist(), strict=True)
        )  # fmt: skip
        local_groups = list(
            zip(b["student_positions"][row][b["mask"][row]].tolist(),
                b["teacher_positions"][row][b["mask"][row]].tolist(), strict=True)
        )  # fmt: skip
        # served position j = "after j teacher tokens" = the local teacher's position j - 1;
        # the local run also compares the group that predicts the teacher's EOS, the server
        # scores the text alone (only when the student still has its EOS after max_length)
        assert served_groups == local_groups[: len(served_groups)]
        assert len(local_groups) - len(served_groups) in (0, 1)
    same = {**a, "teacher_positions": (a["teacher_positions"] - 1).clamp(min=0)}

    torch.manual_seed(0)
    logits = torch.randn(*batch["inputs"]["input_ids"].shape, 260, dtype=torch.float32)
    got = _kd_term(run).loss(logits, batch["teacher.topk"], a)
    want = _kd_term(local).loss(logits, other["teacher.topk"], same)
    assert math.isfinite(got.item()) and got.item() > 0
    assert batch["teacher.topk"].shape[-1] == other["teacher.topk"].shape[-1] == 2 * K + 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_rows_are_scored_once_and_a_stale_file_is_refused(
    served: ServerThread,
    tiny_model_dir: Path,
    texts: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    data = _config(texts, out, "uld", teacher=_served(served.url, tiny_model_dir))
    first = build_lm_run(lm_config_from_dict(data))
    assert first.info["teacher_cache"]["built"]

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server was asked again")

    monkeypatch.setattr("kdistill.serve.scoring.score_texts_sync", no_server)
    again = build_lm_run(lm_config_from_dict(data))
    assert again.info["teacher_cache"]["built"] is False
    assert torch.equal(_first_batch(first)["teacher.topk"], _first_batch(again)["teacher.topk"])
    for change, what in (
        ({"cache_topk": 4}, "top-k"),
        ({"teacher": _served("http://127.0.0.1:9/v1", tiny_model_dir)}, "teacher server"),
    ):
        stale = _config(
            texts, out, "uld", **{"teacher": _served(served.url, tiny_model_dir), **change}
        )
        with pytest.raises(ConfigError, match=rf"^distill\.cache_dir: .* stale: .*{what}"):
            build_lm_run(lm_config_from_dict(stale))
    shorter = _config(texts, out, "uld", teacher=_served(served.url, tiny_model_dir))
    shorter["data"]["max_length"] = 24  # other student tokens
    with pytest.raises(ConfigError, match="training texts"):
        build_lm_run(lm_config_from_dict(shorter))
    (out / "cache" / ROWS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"^distill\.cache_dir: .* unreadable"):
        build_lm_run(lm_config_from_dict(data))


def test_a_run_learns_the_served_teacher(
    served: ServerThread, tiny_model_dir: Path, texts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    data = _config(texts, out, "hybrid", teacher=_served(served.url, tiny_model_dir), alpha=1.0)
    data["train"]["epochs"] = 4
    data["optim"] = {"lr": 1e-2, "schedule": "constant"}
    summary = run_lm(lm_config_from_dict(data)).summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [row["train_kd_loss"] for row in rows]
    assert all(math.isfinite(v) and v > 0 for v in kd)
    assert all(later < earlier for earlier, later in itertools.pairwise(kd)), kd
    assert summary["cross_tokenizer"]["loss"] == "hybrid"
    assert math.isfinite(summary["student"]["final"]["bits_per_byte"])


def test_a_shifting_server_is_refused(
    teacher: Any, tiny_model_dir: Path, texts: Path, tmp_path: Path
) -> None:
    with ServerThread(shifting_app(teacher)) as shifting:
        data = _config(texts, tmp_path / "a", "uld", teacher=_served(shifting.url, tiny_model_dir))
        with pytest.raises(ConfigError, match=r"^distill\.teacher: .*shifted by one position"):
            build_lm_run(lm_config_from_dict(data))
    assert not (tmp_path / "a" / "cache" / ROWS_FILE).exists()


def test_a_server_without_token_ids_gives_the_same_rows_less_the_unreadable(
    served: ServerThread, teacher: Any, tiny_model_dir: Path, texts: Path, tmp_path: Path
) -> None:
    """llama.cpp's kind of server (no token-id prompts: HTTP 500; tokens named by text only;
    echo rows one late, none at position 0), ``on_shift: correct``: the texts go out as
    strings, its tokens are read back through the teacher tokenizer, and the rows equal the
    id-giving server's on the same texts — the same alignment, every alternative at the same
    log-probability — less the alternatives no id can be read from (partial UTF-8 bytes) and
    the row after a text's first token when that token is a partial byte."""
    with ServerThread(shifting_app(teacher, llamacpp=True)) as llama:
        data = _config(texts, tmp_path / "llama", "uld",
                       teacher=_served(llama.url, tiny_model_dir, on_shift="correct"))  # fmt: skip
        with pytest.warns(UserWarning, match="rejects token-id prompts"):
            build_lm_run(lm_config_from_dict(data))
    data = _config(texts, tmp_path / "ids", "uld", teacher=_served(served.url, tiny_model_dir))
    build_lm_run(lm_config_from_dict(data))
    by_text, by_id = (load_file(tmp_path / name / "cache" / ROWS_FILE) for name in ("llama", "ids"))
    for name in ("student_positions", "teacher_positions"):
        assert torch.equal(by_text[name], by_id[name]), name
    # the one row it cannot give: after a first token that is a partial UTF-8 byte (the
    # row at position 0 is fetched by sending the first token alone, as text)
    differ = (by_text["mask"] != by_id["mask"]).nonzero().tolist()
    assert all(not by_text["mask"][n, g] and by_text["teacher_positions"][n, g] == 1
               for n, g in differ), differ  # fmt: skip
    assert len(differ) <= sum(not line[0].isascii() for line in LINES), differ
    kept = dropped = 0
    rows = zip(by_text["ids"].flatten(0, 1), by_text["log_probs"].flatten(0, 1),
               by_id["ids"].flatten(0, 1), by_id["log_probs"].flatten(0, 1), strict=True)  # fmt: skip
    for text_ids, text_lp, id_ids, id_lp in rows:
        want = {int(i): float(v) for i, v in zip(id_ids, id_lp, strict=True) if v > -math.inf}
        got = {int(i): float(v) for i, v in zip(text_ids, text_lp, strict=True) if v > -math.inf}
        # student ids (< 260) compare directly; ids past them are numbered per run
        byte_ids = {i: v for i, v in got.items() if i < 260}
        assert all(want.get(i) == pytest.approx(v, abs=1e-5) for i, v in byte_ids.items())
        kept, dropped = kept + len(got), dropped + len(want) - len(got)
        assert len(got) <= len(want)
    assert kept > dropped > 0, (kept, dropped)  # most are readable; some are not


def test_config_mistakes_name_the_key(tiny_model_dir: Path, texts: Path, tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/v1"
    no_tokenizer = _config(texts, tmp_path, "uld", teacher=_served(url, tiny_model_dir))
    del no_tokenizer["distill"]["teacher"]["tokenizer"]
    with pytest.raises(ConfigError, match=r"^distill\.teacher\.tokenizer: .*needs the served"):
        lm_config_from_dict(no_tokenizer)
    same = _config(texts, tmp_path, "uld", teacher=_served(url, tiny_model_dir))
    same["distill"]["cross_tokenizer"] = None
    with pytest.raises(ConfigError, match=r"^distill\.teacher\.tokenizer: .*remove it"):
        lm_config_from_dict(same)
    missing = _config(texts, tmp_path, "uld", teacher=_served(url, tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^distill\.teacher\.tokenizer: cannot load"):
        build_lm_run(lm_config_from_dict(missing))


def test_a_server_of_another_tokenizer_is_named(
    served: ServerThread, texts: Path, tmp_path: Path
) -> None:
    """distill.teacher.tokenizer is not the served model's: the ids come back other."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([line[::-1] for line in LINES] * 8, trainer)  # other merges
    folder = tmp_path / "other"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    data = _config(texts, tmp_path / "run", "uld", teacher=_served(served.url, folder))
    with pytest.raises(ConfigError, match=r"^distill\.teacher: .*tokenizer of the served model"):
        build_lm_run(lm_config_from_dict(data))


def test_cli_names_a_missing_served_tokenizer_in_one_line(
    tiny_model_dir: Path, texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from kdistill.cli import main

    data = _config(
        texts, tmp_path / "run", "uld", teacher=_served("http://127.0.0.1:9/v1", tiny_model_dir)
    )
    del data["distill"]["teacher"]["tokenizer"]
    path = tmp_path / "served_cross.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["lm", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) <= 2 and "distill.teacher.tokenizer" in err[-1] and "Traceback" not in "".join(err)
    )
