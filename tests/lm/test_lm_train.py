"""End-to-end LM runs from the example YAML files (`kdistill lm`, `kdistill.lm.train`)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.checkpoint import load_weights  # noqa: E402
from kdistill.cli import main  # noqa: E402
from kdistill.lm.config import load_lm_config  # noqa: E402
from kdistill.lm.train import build_lm_run, run_lm  # noqa: E402
from kdistill.trainer import ResumeWarning  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"


def _overrides(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.text_file={TEXT}", "train.progress=false", *extra]


def test_cli_runs_the_token_kd_example_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["lm", str(EXAMPLES / "tiny_token_kd.yaml")]
    for item in _overrides(out, "train.epochs=1"):
        args += ["--set", item]
    assert main(args) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    final = summary["student"]["final"]
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    assert final["loss"] < summary["student"]["initial"]["loss"]  # it learned something
    assert summary["student"]["parameters"] < summary["teacher"]["parameters"]
    for name in ("metrics.csv", "steps.jsonl", "student.safetensors"):
        assert (out / name).is_file()
    # the HF folder and the safetensors file hold the same student
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "student")
    hf.load_state_dict(load_weights(out / "student.safetensors"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kd_loss", "train_ce_loss", "test_perplexity"} <= set(row)


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys) -> None:
    code = main(["lm", str(EXAMPLES / "tiny_token_kd.yaml"), "--set", "distill.divergence=kl"])
    assert code == 2
    assert "distill.divergence: 'kl' is not allowed" in capsys.readouterr().err


def test_resume_after_an_interrupted_run_gives_the_same_student(tmp_path: Path) -> None:
    full = tmp_path / "full"
    cfg = load_lm_config(EXAMPLES / "tiny_token_kd.yaml", _overrides(full, "train.epochs=2"))
    run_lm(cfg)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "epoch-0002")  # as if killed before the 2nd save
    (cut / "student.safetensors").unlink()
    resumed = load_lm_config(EXAMPLES / "tiny_token_kd.yaml", _overrides(cut, "train.epochs=2"))
    with pytest.warns(ResumeWarning, match="output_dir"):  # the only difference: harmless
        run_lm(resumed, resume=True)
    a, b = load_weights(full / "student.safetensors"), load_weights(cut / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "steps.jsonl").read_text() == (cut / "steps.jsonl").read_text()


def test_seqkd_example_trains_on_the_teachers_greedy_continuations(tmp_path: Path) -> None:
    out = tmp_path / "seqkd"
    cfg = load_lm_config(EXAMPLES / "tiny_seqkd.yaml", _overrides(out, "data.max_examples=20"))
    result = run_lm(cfg)
    lines = (out / "seqkd_examples.jsonl").read_text().splitlines()
    examples = [json.loads(line) for line in lines[1:]]
    assert len(examples) == result.summary["seqkd"]["prompts"] > 0
    assert all(x["prompt_length"] == 8 for x in examples)
    # the run's teacher really produced these targets: re-run it greedily on one prompt
    run = build_lm_run(cfg)
    assert run.teacher is not None
    prompt = examples[0]["input_ids"][:8]
    with torch.no_grad():
        generated = run.teacher.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=256
        )[0, 8:].tolist()
    eos = 258
    if eos in generated:
        generated = generated[: generated.index(eos) + 1]
    assert examples[0]["input_ids"][8:] == generated
    assert build_lm_run(cfg).info["seqkd"] == {"cached": True}  # reused, e.g. on --resume


def test_gkd_example_mixes_student_samples(tmp_path: Path) -> None:
    out = tmp_path / "gkd"
    cfg = load_lm_config(
        EXAMPLES / "tiny_gkd.yaml", _overrides(out, "seqkd.lam=1.0", "data.max_examples=20")
    )
    summary = run_lm(cfg).summary
    assert summary["on_policy_batches"] == 2  # 16 training texts, batches of 8, λ = 1


def test_distilbert_example_runs_the_triple_loss(tmp_path: Path) -> None:
    out = tmp_path / "distilbert"
    summary = run_lm(load_lm_config(EXAMPLES / "tiny_distilbert.yaml", _overrides(out))).summary
    assert summary["weights"] == {"kd": 5.0, "mlm": 2.0, "cos": 1.0}
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kd_loss", "train_mlm_loss", "train_cos_loss"} <= set(row)
    assert summary["student"]["final"]["loss"] < summary["student"]["initial"]["loss"]


def test_alpha_zero_is_the_teacher_free_baseline(tmp_path: Path) -> None:
    cfg = load_lm_config(EXAMPLES / "tiny_token_kd.yaml", _overrides(tmp_path, "distill.alpha=0.0"))
    run = build_lm_run(cfg)
    assert run.distiller.teacher is None
    assert [t.name for t in run.distiller.terms] == ["ce"]


def test_cli_runs_the_cached_token_kd_example(tmp_path: Path, capsys) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["lm", str(EXAMPLES / "tiny_token_kd_cached.yaml")]
    for item in _overrides(out, "train.epochs=1", f"distill.cache_dir={cache}"):
        args += ["--set", item]
    assert main(args) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_cache"]["built"] and summary["teacher_cache"]["k"] == 64
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["layout"] == "topk" and manifest["k"] == 64
    assert summary["student"]["final"]["loss"] < summary["student"]["initial"]["loss"]
