"""`kdistill lm` with the fused head (``distill.fused``): same run as the plain path.

Each objective that can fuse is trained twice from the same config — ``distill.fused: true``
(:class:`~kdistill.lm.fused_run.FusedTokenKD`, no student logits) and ``false`` (the plain
Distiller terms) — and the per-step losses (1e-6), the logged KD / CE parts and the trained
student weights (1e-5) must agree; ``auto`` must pick the fused path exactly where it applies.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.checkpoint import load_weights  # noqa: E402
from kdistill.config import ConfigError  # noqa: E402
from kdistill.distiller import Distiller  # noqa: E402
from kdistill.lm.config import load_lm_config  # noqa: E402
from kdistill.lm.fused_run import FusedTokenKD  # noqa: E402
from kdistill.lm.train import build_lm_run, run_lm  # noqa: E402
from kdistill.trainer import unpack_batch  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"
SETTINGS = [
    f"data.text_file={TEXT}",
    "data.max_examples=20",  # 16 training texts: 2 batches of 8
    "train.progress=false",
    "train.epochs=1",
]


def _config(example: str, out: Path, *extra: str):
    return load_lm_config(EXAMPLES / example, [f"output_dir={out}", *SETTINGS, *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _history(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _same_run(example: str, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """Train fused and plain; assert equal step losses and weights; return both summaries."""
    fused = run_lm(_config(example, tmp_path / "fused", "distill.fused=true", *extra))
    plain = run_lm(_config(example, tmp_path / "plain", "distill.fused=false", *extra))
    assert fused.summary["fused"] is True and plain.summary["fused"] is False
    a, b = _rows(fused.output_dir), _rows(plain.output_dir)
    assert len(a) == len(b) >= 2
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    wa, wb = load_weights(fused.fit.student_path), load_weights(plain.fit.student_path)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5, rtol=0), key
    return fused.summary, plain.summary


def test_fused_token_kd_live_teacher_equals_plain_run(tmp_path: Path) -> None:
    _same_run("tiny_token_kd.yaml", tmp_path)
    # the fused run writes the usual run folder
    out = tmp_path / "fused"
    for name in ("summary.json", "steps.jsonl", "student.safetensors", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "student" / "model.safetensors").is_file()


def test_fused_token_kd_cached_topk_equals_plain_run(tmp_path: Path) -> None:
    cache = f"distill.cache_dir={tmp_path / 'cache'}"
    _same_run("tiny_token_kd_cached.yaml", tmp_path, cache)


def test_fused_gkd_equals_plain_run(tmp_path: Path) -> None:
    _same_run("tiny_gkd.yaml", tmp_path)


def _first_step(run, opt_lr: float = 0.1) -> tuple[dict, dict[str, torch.Tensor]]:
    """One forward/backward/SGD step on the first batch; the outputs and the new weights."""
    model = run.distiller
    model.train()
    batch = next(iter(run.train_loader))
    x, y, cached, index = unpack_batch(batch, "cpu")
    out = model(x, y, teacher_outputs=cached, index=index)
    out["loss"].backward()
    params = list(model.trainable_parameters())
    torch.optim.SGD(params, lr=opt_lr).step()
    return out, {k: v.detach().clone() for k, v in run.student.state_dict().items()}


@pytest.mark.parametrize("cached", [False, True])
def test_one_step_parts_and_weights_equal(tmp_path: Path, cached: bool) -> None:
    example = "tiny_token_kd_cached.yaml" if cached else "tiny_token_kd.yaml"
    extra = [f"distill.cache_dir={tmp_path / 'cache'}"] if cached else []
    fused = build_lm_run(_config(example, tmp_path / "f", "distill.fused=true", *extra))
    plain = build_lm_run(_config(example, tmp_path / "p", "distill.fused=false", *extra))
    assert isinstance(fused.distiller, FusedTokenKD) and isinstance(plain.distiller, Distiller)
    a, wa = _first_step(fused)
    b, wb = _first_step(plain)
    assert a["logits"] is None
    for key in ("loss", "kd_loss", "ce_loss"):
        assert float(a[key].detach()) == pytest.approx(float(b[key].detach()), abs=1e-6), key
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5, rtol=0), key
    # the step moved the weights (the comparison is not of two untouched copies)
    fresh = build_lm_run(_config(example, tmp_path / "n", *extra)).student.state_dict()
    assert max(float((wa[k] - fresh[k]).abs().max()) for k in wa) > 1e-3
    # checkpoints hold the plain run's keys; the teacher is outside the module tree (DDP)
    keys = fused.distiller.trainable_state_dict().keys()
    assert keys == plain.distiller.trainable_state_dict().keys()
    assert all(k.startswith("student.") for k in keys)
    trainable = {id(p) for p in plain.distiller.trainable_parameters()}
    assert {id(p) for p in fused.distiller.parameters()} == {
        id(p) for p in fused.student.parameters()
    }
    assert len(list(fused.distiller.trainable_parameters())) == len(trainable)


def test_auto_picks_fused_where_it_applies(tmp_path: Path) -> None:
    def model(example: str, *extra: str):
        return build_lm_run(_config(example, tmp_path / example, *extra)).distiller

    assert isinstance(model("tiny_token_kd.yaml"), FusedTokenKD)
    assert isinstance(model("tiny_gkd.yaml"), FusedTokenKD)
    cache = f"distill.cache_dir={tmp_path / 'cache'}"
    topk = model("tiny_token_kd_cached.yaml", cache)
    assert isinstance(topk, FusedTokenKD) and topk.teacher is None
    assert isinstance(model("tiny_token_kd.yaml", "distill.alpha=0"), Distiller)  # CE alone
    assert isinstance(model("tiny_token_kd.yaml", "distill.fused=false"), Distiller)
    assert isinstance(model("tiny_distilbert.yaml"), Distiller)


def test_fused_true_where_it_cannot_apply_names_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"distill\.fused: true .*alpha: 0"):
        build_lm_run(
            _config("tiny_token_kd.yaml", tmp_path, "distill.fused=true", "distill.alpha=0")
        )
    with pytest.raises(ConfigError, match=r"distill\.fused: true .*distilbert"):
        build_lm_run(_config("tiny_distilbert.yaml", tmp_path, "distill.fused=true"))


def test_chunk_bytes_is_validated_and_passed_on(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chunk_bytes: give chunk_size .* not both"):
        _config("tiny_token_kd.yaml", tmp_path, "distill.chunk_size=8", "distill.chunk_bytes=4096")
    with pytest.raises(ConfigError, match=r"chunk_bytes: must be > 0"):
        _config("tiny_token_kd.yaml", tmp_path, "distill.chunk_bytes=0")
    with pytest.raises(ConfigError, match=r"distill\.fused: 'maybe' is not allowed"):
        _config("tiny_token_kd.yaml", tmp_path, "distill.fused=maybe")
    cfg = _config("tiny_token_kd.yaml", tmp_path, "distill.chunk_bytes=4096")
    fused = build_lm_run(cfg).distiller
    assert isinstance(fused, FusedTokenKD) and fused.chunk_bytes == 4096
    plain = build_lm_run(
        _config("tiny_token_kd.yaml", tmp_path, "distill.chunk_bytes=4096", "distill.fused=false")
    ).distiller
    assert plain.terms[0].loss.chunk_bytes == 4096


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_fused_run_equals_one_process_plain_run(tmp_path: Path, parallel: str) -> None:
    """Under torchrun the Trainer wraps FusedTokenKD whole in DDP (the teacher outside it), or
    the student is FSDP2-sharded: the global token mean over both ranks is the one-process
    plain run's loss, step by step, and the trained weights agree."""
    out = tmp_path / parallel
    args = [str(EXAMPLES / "tiny_token_kd.yaml")]
    for item in [
        f"output_dir={out}",
        *SETTINGS,
        f"train.parallel={parallel}",
        "distill.fused=true",
    ]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "kdistill", "lm", *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["fused"], summary["processes"], summary["parallel"]) == (True, 2, parallel)
    plain = run_lm(_config("tiny_token_kd.yaml", tmp_path / "plain", "distill.fused=false"))
    losses = [row["loss"] for row in _rows(out)]
    assert losses == pytest.approx([row["loss"] for row in _rows(plain.output_dir)], abs=2e-6)
    wa, wb = load_weights(out / "student.safetensors"), load_weights(plain.fit.student_path)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5, rtol=0), key
