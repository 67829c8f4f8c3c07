"""`kdistill lm` with a teacher and a student on different tokenizers (``distill.cross_tokenizer``),
held-out bits per byte in every run's summary, and the teacher tokenizer in the top-k cache.

The teacher's tokenizer is a byte-level BPE trained here on ``examples/lm/tiny.txt``; the
student reads UTF-8 bytes (:class:`~kdistill.lm.batches.ByteTokenizer`). Models are tiny
random Llamas; every run takes seconds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kdistill.cache import StaleCacheError, build_topk_cache, load_or_build_topk  # noqa: E402
from kdistill.cli import main  # noqa: E402
from kdistill.config import ConfigError  # noqa: E402
from kdistill.lm import train as lm_train  # noqa: E402
from kdistill.lm.alignment import tokenizer_identity  # noqa: E402
from kdistill.lm.batches import ByteTokenizer  # noqa: E402
from kdistill.lm.bpb import evaluate_bits_per_byte  # noqa: E402
from kdistill.lm.config import load_lm_config  # noqa: E402
from kdistill.lm.cross_tokenizer import CrossTokenizerCollator  # noqa: E402
from kdistill.lm.train import build_lm_run, run_lm  # noqa: E402
from kdistill.lm.uld import HybridULDLoss, ULDLoss  # noqa: E402
from kdistill.trainer import batch_extras  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"
CROSS = EXAMPLES / "tiny_cross_tokenizer.yaml"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A 320-id byte-level BPE trained on tiny.txt, saved as a tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.read_text(encoding="utf-8").splitlines(), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    folder = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(str(folder))
    return folder


def _cross(out: Path, bpe: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"teacher.tokenizer={bpe}",
        "train.progress=false",
        "teacher.config.initializer_range=1.0",  # a peaked random teacher, something to learn
        *extra,
    ]


def _epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_cross_tokenizer_run_learns_the_teacher_and_reports_bits_per_byte(tmp_path, bpe, loss):
    out = tmp_path / loss
    cfg = load_lm_config(
        CROSS,
        _cross(
            out,
            bpe,
            f"distill.cross_tokenizer={loss}",
            "distill.alpha=1.0",  # KD alone: its term must go down
            "train.epochs=4",
            "optim.lr=1.0e-2",
            "optim.schedule=constant",
        ),
    )
    summary = run_lm(cfg).summary
    kd = [row["train_kd_loss"] for row in _epochs(out)]
    assert all(math.isfinite(v) and v > 0 for v in kd)
    assert all(later < earlier for earlier, later in itertools.pairwise(kd)), kd
    assert kd[-1] < 0.95 * kd[0], kd  # the student moved towards the teacher
    info = summary["cross_tokenizer"]
    assert info["loss"] == loss and info["student_tokenizer"] == "byte (260 ids)"
    assert str(bpe) in info["teacher_tokenizer"] and "320 ids" in info["teacher_tokenizer"]
    if loss == "hybrid":  # the 256 single bytes both vocabularies hold
        assert info["matched_tokens"] == 256
    teacher, student = summary["teacher"]["eval"], summary["student"]
    for metrics in (teacher, student["initial"], student["final"]):
        assert math.isfinite(metrics["bits_per_byte"]) and metrics["bits_per_byte"] > 0
        assert math.isfinite(metrics["perplexity"])
    # the teacher's figures are on its own tokens of the same held-out texts
    run = build_lm_run(cfg)
    assert run.teacher_tokenizer is not run.tokenizer and run.teacher_eval_loader is not None
    own = evaluate_bits_per_byte(run.teacher, run.teacher_tokenizer, run.eval_texts, max_length=96)
    assert teacher["bits_per_byte"] == pytest.approx(own["bits_per_byte"], rel=1e-6)
    batch = next(iter(run.train_loader))
    assert batch["teacher_inputs"]["input_ids"].max() >= 260  # BPE ids, not bytes
    assert int(batch["alignment"]["mask"].sum()) > 0
    term = run.distiller.terms[0]
    assert isinstance(term.loss, ULDLoss if loss == "uld" else HybridULDLoss)


def test_cli_runs_the_cross_tokenizer_example(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["lm", str(CROSS), "--set", f"output_dir={out}", "--set", "train.epochs=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "held-out bits per byte" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cross_tokenizer"]["loss"] == "hybrid"
    assert (
        summary["student"]["final"]["bits_per_byte"]
        < summary["student"]["initial"]["bits_per_byte"]
    )


def test_different_tokenizers_without_cross_tokenizer_name_both(tmp_path, bpe, capsys):
    args = ["lm", str(CROSS)]
    for item in _cross(tmp_path / "run", bpe, "distill.cross_tokenizer=null"):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "distill.cross_tokenizer" in err and "uld or hybrid" in err
    assert f"teacher.tokenizer: {bpe}" in err and "320 ids" in err  # the teacher's
    assert "data.tokenizer: byte (260 ids)" in err  # the student's


def test_hybrid_with_one_tokenizer_is_token_kd_on_a_batch(tmp_path):
    """Same tokenizer on both sides: every token is its own aligned group, the matched set is
    the whole vocabulary, so the hybrid term is the plain token-level divergence."""
    base = [f"output_dir={tmp_path}", f"data.text_file={TEXT}", "distill.divergence=jsd"]
    plain = build_lm_run(load_lm_config(EXAMPLES / "tiny_token_kd.yaml", base))
    cross = build_lm_run(
        load_lm_config(EXAMPLES / "tiny_token_kd.yaml", [*base, "distill.cross_tokenizer=hybrid"])
    )
    assert cross.teacher_tokenizer is cross.tokenizer  # byte and byte: one tokenizer
    a, b = next(iter(plain.train_loader)), next(iter(cross.train_loader))
    assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])  # same batches
    assert torch.equal(a["target"], b["target"])
    assert torch.equal(b["teacher_inputs"]["input_ids"], b["inputs"]["input_ids"])
    with torch.no_grad():
        out_a = plain.distiller(a["inputs"], a["target"])
        out_b = cross.distiller(b["inputs"], b["target"], extras=batch_extras(b, "cpu"))
    assert out_a["kd_loss"] > 0
    torch.testing.assert_close(out_b["kd_loss"], out_a["kd_loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_b["loss"], out_a["loss"], rtol=1e-5, atol=1e-7)


def test_every_run_reports_bits_per_byte_of_the_held_out_texts(tmp_path):
    cfg = load_lm_config(
        EXAMPLES / "tiny_token_kd.yaml",
        [f"output_dir={tmp_path}", f"data.text_file={TEXT}", "train.epochs=1"],
    )
    summary = run_lm(cfg).summary
    initial, final = summary["student"]["initial"], summary["student"]["final"]
    assert final["bits_per_byte"] < initial["bits_per_byte"]
    assert initial["bits_per_byte"] == pytest.approx(math.log2(260), rel=0.05)  # ~uniform init
    run = build_lm_run(cfg)  # the same teacher (seeded), the same held-out texts
    lines = [line.strip() for line in TEXT.read_text(encoding="utf-8").splitlines()]
    assert len(run.eval_texts) == summary["eval_texts"] and set(run.eval_texts) <= set(lines)
    eos = ByteTokenizer.eos_token_id
    expected = [[*ByteTokenizer().encode(t), eos][: cfg.data.max_length] for t in run.eval_texts]
    assert expected == _eval_ids(run)  # the texts of the held-out batches, in order
    own = evaluate_bits_per_byte(run.teacher, run.tokenizer, run.eval_texts, max_length=64)
    assert summary["teacher"]["eval"]["bits_per_byte"] == pytest.approx(
        own["bits_per_byte"], rel=1e-6
    )


def _eval_ids(run) -> list[list[int]]:
    ids = []
    for batch in run.eval_loader:
        for row, mask in zip(
            batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"], strict=True
        ):
            ids.append(row[mask.bool()].tolist())
    return ids


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["distill.objective=seqkd"], "distill.cross_tokenizer: teacher and student tokenizers"),
        (["distill.cross_tokenizer=null", "data.teacher_max_length=16"], "data.teacher_max_length"),
        (
            ["student.tokenizer=byte"],
            "student.tokenizer: the student's tokenizer is data.tokenizer",
        ),
        (["distill.matched_weight=0.5"], "distill.matched_weight: give both"),
        (["distill.cross_tokenizer=uld", "distill.matched_weight=0.5"], "cross_tokenizer: hybrid"),
        (
            [
                "distill.teacher.endpoint=http://x",
                "distill.teacher.model=m",
                "distill.teacher.tokenizer=t",
                "distill.cache_dir=c",
                "teacher=null",
                "data.teacher_max_length=16",
            ],
            "data.teacher_max_length: a served teacher",
        ),
    ],
)
def test_cross_tokenizer_config_mistakes_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_lm_config(CROSS, [f"output_dir={tmp_path}", *extra])


def test_cross_tokenizer_under_torchrun_is_a_clear_error(tmp_path, bpe, monkeypatch):
    cfg = load_lm_config(CROSS, _cross(tmp_path, bpe))
    monkeypatch.setattr(lm_train.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"runs in one process.*without torchrun"):
        build_lm_run(cfg)


# --------------------------------------------------------------------------- top-k cache


def _rows(n: int, width: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    values = torch.log_softmax(torch.randn(n, width, k), -1) - 0.1
    indices = torch.arange(k).expand(n, width, k).clone()
    return [(values, indices, torch.full((n, width), math.log(1 - math.exp(-0.1))))]


def test_topk_cache_records_the_teacher_tokenizer_and_refuses_another(tmp_path, bpe):
    path, inputs = tmp_path / "cache", torch.zeros(3, 4, dtype=torch.long)
    byte = tokenizer_identity(ByteTokenizer())
    other = tokenizer_identity(transformers.AutoTokenizer.from_pretrained(str(bpe)))
    kwargs = {"identity": {"class": "x", "sha256": "0"}, "data_name": "d", "k": 2}
    build_topk_cache(path, _rows(3, 4, 2), inputs, vocab_size=260, tokenizer=byte, **kwargs)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["teacher_tokenizer"] == byte and byte["fingerprint"] != other["fingerprint"]
    cache, built = load_or_build_topk(path, lambda: [], inputs, tokenizer=byte, **kwargs)
    assert not built and cache.num_rows == 3  # the same tokenizer: reused
    with pytest.raises(StaleCacheError, match="teacher tokenizer"):
        load_or_build_topk(path, lambda: [], inputs, tokenizer=other, **kwargs)


def test_lm_topk_cache_manifest_holds_the_teacher_tokenizer(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_lm_config(
        EXAMPLES / "tiny_token_kd_cached.yaml",
        [f"output_dir={tmp_path / 'run'}", f"data.text_file={TEXT}", f"distill.cache_dir={cache}"],
    )
    build_lm_run(cfg)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher_tokenizer"] == tokenizer_identity(ByteTokenizer())


def test_trimmed_teacher_reads_only_the_bytes_the_student_kept(bpe):
    teacher = transformers.AutoTokenizer.from_pretrained(str(bpe))
    texts = TEXT.read_text(encoding="utf-8").splitlines()[:4]
    kwargs = {"max_length": 20, "append_eos": True}  # BOS + the first 19 bytes of each text
    full = CrossTokenizerCollator(ByteTokenizer(), teacher, **kwargs)(texts)
    trim = CrossTokenizerCollator(ByteTokenizer(), teacher, trim_teacher=True, **kwargs)(texts)
    for key in ("student_positions", "teacher_positions", "mask"):  # the same groups
        assert torch.equal(full["alignment"][key], trim["alignment"][key])
    long_ids, short_ids = full["teacher_inputs"]["input_ids"], trim["teacher_inputs"]["input_ids"]
    assert short_ids.shape[1] < long_ids.shape[1]
    for row, short, mask in zip(
        long_ids, short_ids, trim["teacher_inputs"]["attention_mask"], strict=True
    ):
        kept = short[mask.bool()]
        assert torch.equal(row[: len(kept)], kept)  # a prefix of the teacher's tokens
        assert len(teacher.decode(kept.tolist()).encode("utf-8")) <= 19


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_cross_tokenizer_from_the_topk_cache_equals_the_live_teacher(tmp_path, bpe, loss):
    """An exact cache (k = the teacher's 320 ids, float32) gives the live teacher's KD term;
    its manifest records the teacher's tokenizer, and the next run reuses it."""
    cache = tmp_path / "cache"
    common = _cross(tmp_path / "run", bpe, f"distill.cross_tokenizer={loss}")
    live = build_lm_run(load_lm_config(CROSS, common))
    more = [f"distill.cache_dir={cache}", "distill.cache_topk=320", "distill.cache_dtype=float32"]
    cached = build_lm_run(load_lm_config(CROSS, [*common, *more]))
    assert cached.distiller.teacher is None and cached.info["teacher_cache"]["built"]
    a, b = next(iter(live.train_loader)), next(iter(cached.train_loader))
    assert torch.equal(a["teacher_inputs"]["input_ids"], b["teacher_inputs"]["input_ids"])
    with torch.no_grad():
        out_a = live.distiller(a["inputs"], a["target"], extras=batch_extras(a, "cpu"))
        out_b = cached.distiller(
            b["inputs"], b["target"], teacher_outputs={"topk": b["teacher.topk"]},
            extras=batch_extras(b, "cpu"),
        )  # fmt: skip
    assert out_a["kd_loss"] > 0
    torch.testing.assert_close(out_b["kd_loss"], out_a["kd_loss"], rtol=1e-4, atol=1e-6)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher_tokenizer"] == tokenizer_identity(live.teacher_tokenizer)
    again = build_lm_run(load_lm_config(CROSS, [*common, *more]))
    assert not again.info["teacher_cache"]["built"]
