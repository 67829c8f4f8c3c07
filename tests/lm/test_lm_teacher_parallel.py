"""The frozen teacher sharded with FSDP2 (``teacher.parallel: fsdp``) or kept in half precision
(``teacher.dtype``).

The 2-process tests start this file as a script under ``python -m torch.distributed.run
--nproc_per_node 2`` (gloo, CPU): each rank builds the same random tiny Llama teacher, keeps
one whole copy and shards the other with :func:`kdistill.distributed.shard_teacher`, and
compares on its own batch the sharded teacher's logits and the fused loss's inputs (final
hidden states, ``lm_head`` weight) with the whole teacher's. Then a ``kdistill lm`` token-KD
run with ``teacher.parallel: fsdp`` under torchrun is checked against the same 2-process run
with the whole teacher on every rank (per-step losses, final weights).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdistill import distributed
from kdistill.lm.fused import causal_lm_head_inputs

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else None

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"
TOL = 1e-6
"""The all-gathered parameters are the whole teacher's bit for bit, so the outputs agree to
float rounding only (the issue's bound)."""
BF16_REL = 2.0**-8
"""Relative bound on the KD loss of a half-precision teacher: bfloat16's unit roundoff
(8 significant bits; float16 has 11). Measured on these tiny random models (near-uniform
logits): 1.0e-5 relative for bfloat16, 4.5e-7 for float16."""


def _teacher() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return tf.LlamaForCausalLM(config).eval()


def _compare_on_this_rank(out: Path) -> None:
    """The worker (one per rank): sharded vs whole teacher on this rank's own batch."""
    rank, world = distributed.init_from_env()
    torch.set_num_threads(1)
    whole = _teacher()
    sharded = distributed.shard_teacher(copy.deepcopy(whole))
    local = sum(p.to_local().numel() for p in sharded.parameters())
    total = sum(p.numel() for p in whole.parameters())
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch, as in training
    ids = torch.randint(0, 96, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding on one row
    inputs = {"input_ids": ids, "attention_mask": mask}
    diffs: dict[str, float] = {}
    with torch.no_grad():
        for step in range(2):  # twice: the second forward reuses FSDP's all-gather buffers
            logits = sharded(**inputs).logits
            distributed.reshard(sharded)
            hidden, weight, _ = causal_lm_head_inputs(sharded, inputs)
            weight = weight.clone()  # read while gathered, as the fused loss does
            distributed.reshard(sharded)
            ref_logits = whole(**inputs).logits
            ref_hidden, ref_weight, _ = causal_lm_head_inputs(whole, inputs)
            diffs[f"logits_{step}"] = (logits - ref_logits).abs().max().item()
            diffs[f"hidden_{step}"] = (hidden - ref_hidden).abs().max().item()
            diffs[f"weight_{step}"] = (weight - ref_weight).abs().max().item()
    resharded = type(sharded.get_output_embeddings().weight).__name__
    report = {"rank": rank, "world": world, "local": local, "total": total, "diffs": diffs}
    report["weight_after_reshard"] = resharded
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.destroy()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


def test_sharded_teacher_outputs_equal_the_whole_teacher(tmp_path: Path) -> None:
    _torchrun(__file__, str(tmp_path))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2
        # each rank holds half of every parameter (dim-0 shards; 96 and 32 rows split evenly)
        assert report["local"] * 2 == report["total"], report
        assert max(report["diffs"].values()) <= TOL, report["diffs"]
        assert report["weight_after_reshard"] == "DTensor"  # freed back to a shard


SETTINGS = [
    f"data.text_file={TEXT}",
    "data.max_examples=20",  # 16 training texts: 2 global batches of 8
    "train.progress=false",
    "train.epochs=2",
]


def _lm_run(out: Path, *settings: str) -> list[float]:
    args = [str(EXAMPLES / "tiny_token_kd.yaml")]
    for item in [f"output_dir={out}", *SETTINGS, *settings]:
        args += ["--set", item]
    _torchrun("-m", "kdistill", "lm", *args)
    lines = (out / "steps.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("fused", ["auto", "false"])
def test_kdistill_lm_with_a_sharded_teacher_matches_the_whole_teacher(
    tmp_path: Path, fused: str
) -> None:
    from kdistill.checkpoint import load_weights

    whole = _lm_run(tmp_path / "whole", f"distill.fused={fused}")
    sharded = _lm_run(tmp_path / "sharded", f"distill.fused={fused}", "teacher.parallel=fsdp")
    assert len(sharded) == 4 and sharded == pytest.approx(whole, abs=TOL)
    a = load_weights(tmp_path / "whole" / "student.safetensors")
    b = load_weights(tmp_path / "sharded" / "student.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    ref = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["fused"] == (fused == "auto")
    assert summary["teacher"]["eval"] == pytest.approx(ref["teacher"]["eval"], abs=TOL)
    assert summary["teacher"]["parameters"] == ref["teacher"]["parameters"]


RANDOM_STUDENT = [  # not a copy of the teacher's layers: a KD loss of order 0.1, not 1e-4
    "student.init_from_teacher=false",
    "student.num_layers=null",
    "student.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128, "
    "tie_word_embeddings: true}",
]


def _config(out: Path, *settings: str):
    from kdistill.lm.config import load_lm_config

    base = [f"output_dir={out}", f"data.text_file={TEXT}", "data.max_examples=20"]
    return load_lm_config(EXAMPLES / "tiny_token_kd.yaml", [*base, "train.epochs=1", *settings])


@pytest.mark.parametrize("fused", ["auto", "false"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_teacher(tmp_path: Path, dtype: str, fused: str) -> None:
    from kdistill.lm.train import build_lm_run
    from kdistill.trainer import unpack_batch

    losses = {}
    for name in ("float32", dtype):
        settings = [f"teacher.dtype={name}", f"distill.fused={fused}", *RANDOM_STUDENT]
        run = build_lm_run(_config(tmp_path / name, *settings))
        assert {p.dtype for p in run.teacher.parameters()} == {getattr(torch, name)}
        assert {p.dtype for p in run.student.parameters()} == {torch.float32}
        x, y, cached, index = unpack_batch(next(iter(run.train_loader)), "cpu")
        out = run.distiller(x, y, teacher_outputs=cached, index=index)
        out["loss"].backward()  # the student's gradients exist and are float32
        assert all(p.grad.dtype == torch.float32 for p in run.student.parameters())
        losses[name] = {k: float(out[k].detach()) for k in ("loss", "kd_loss", "ce_loss")}
    ref, half = losses["float32"], losses[dtype]
    assert ref["ce_loss"] == pytest.approx(half["ce_loss"], abs=1e-6)  # the student alone
    assert half["kd_loss"] == pytest.approx(ref["kd_loss"], rel=BF16_REL)
    assert half["kd_loss"] != ref["kd_loss"]  # the teacher did run in half precision


def test_kdistill_lm_with_a_bfloat16_teacher(tmp_path: Path) -> None:
    from kdistill.lm.train import run_lm

    runs = {}
    for name in ("float32", "bfloat16"):
        runs[name] = run_lm(_config(tmp_path / name, f"teacher.dtype={name}"))
    a, b = (
        json.loads((r.output_dir / "steps.jsonl").read_text().splitlines()[0])
        for r in runs.values()
    )
    assert b["loss"] == pytest.approx(a["loss"], rel=BF16_REL)
    teacher = [r.summary["teacher"]["eval"]["loss"] for r in runs.values()]
    assert teacher[1] == pytest.approx(teacher[0], rel=BF16_REL)


def test_auto_keeps_the_dtype_a_teacher_checkpoint_comes_in(tmp_path: Path) -> None:
    """``teacher.dtype: auto`` (the default) keeps a bf16 checkpoint in bf16 (transformers
    loads it so); ``float32`` upcasts it; a teacher built from a config is float32 either way."""
    from kdistill.lm.train import build_lm_run

    built = build_lm_run(_config(tmp_path / "built", *RANDOM_STUDENT))
    assert {p.dtype for p in built.teacher.parameters()} == {torch.float32}
    folder = tmp_path / "bf16-teacher"
    built.teacher.to(torch.bfloat16).save_pretrained(folder)
    from_path = [f"teacher.path={folder}", "teacher.config={}"]
    for dtype, want in (("auto", torch.bfloat16), ("float32", torch.float32)):
        run = build_lm_run(
            _config(tmp_path / dtype, *RANDOM_STUDENT, *from_path, f"teacher.dtype={dtype}")
        )
        assert {p.dtype for p in run.teacher.parameters()} == {want}
        assert {p.dtype for p in run.student.parameters()} == {torch.float32}


def test_teacher_keys_are_validated(tmp_path: Path) -> None:
    from kdistill.config import ConfigError
    from kdistill.lm.train import build_lm_run

    with pytest.raises(ConfigError, match=r"teacher\.dtype: 'bf16' is not allowed.*bfloat16"):
        _config(tmp_path, "teacher.dtype=bf16")
    with pytest.raises(ConfigError, match=r"teacher\.parallel: 'ddp' is not allowed.*none, fsdp"):
        _config(tmp_path, "teacher.parallel=ddp")
    with pytest.raises(ConfigError, match=r"student\.dtype: bfloat16 is a teacher setting"):
        _config(tmp_path, "student.dtype=bfloat16")
    with pytest.raises(ConfigError, match=r"student\.parallel: fsdp is a teacher setting.*train"):
        _config(tmp_path, "student.parallel=fsdp")
    with pytest.raises(ConfigError, match=r"teacher\.parallel: fsdp .*cache_dir"):
        _config(tmp_path, "teacher.parallel=fsdp", f"distill.cache_dir={tmp_path / 'c'}")
    with pytest.raises(ConfigError, match=r"teacher\.parallel: fsdp .*token_kd.*not gkd"):
        _config(tmp_path, "teacher.parallel=fsdp", "distill.objective=gkd")
    # one process: the message says to launch with torchrun
    with pytest.raises(ConfigError, match=r"teacher\.parallel: fsdp .* launch with torchrun"):
        build_lm_run(_config(tmp_path, "teacher.parallel=fsdp"))


if __name__ == "__main__":
    _compare_on_this_rank(Path(sys.argv[1]))
