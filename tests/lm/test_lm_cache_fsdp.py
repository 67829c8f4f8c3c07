"""`kdistill lm` with an on-disk top-k teacher cache, and under torchrun (DDP, 2 gloo processes).

The cached runs are checked against the live-teacher run of the same config (the top-k
divergence at ``k = V`` with float32 values *is* the dense divergence), the cached tensors
against the teacher's own top-k, and the 2-process run against the 1-process run (same
global batches: the final weights agree up to float summation order).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.cache import MANIFEST, topk_log_probs  # noqa: E402
from kdistill.checkpoint import load_weights  # noqa: E402
from kdistill.config import ConfigError  # noqa: E402
from kdistill.distiller import call_model, output_logits  # noqa: E402
from kdistill.lm.batches import IGNORE_INDEX  # noqa: E402
from kdistill.lm.config import load_lm_config  # noqa: E402
from kdistill.lm.divergences import token_divergence  # noqa: E402
from kdistill.lm.topk import TOPK, TopKTokenKDLoss, pack_topk, unpack_topk  # noqa: E402
from kdistill.lm.train import build_lm_run, run_lm  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"
VOCAB = 260  # byte tokenizer
ATOL = 2e-5
"""Float summation order differs (padded widths, half-batch gradients all-reduced)."""


def _config(out: Path, *extra: str):
    overrides = [
        f"output_dir={out}",
        f"data.text_file={TEXT}",
        "data.max_examples=20",  # 16 training texts: 2 global batches of 8
        "train.progress=false",
        *extra,
    ]
    return load_lm_config(EXAMPLES / "tiny_token_kd.yaml", overrides)


def _step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_weights(a / "student.safetensors"), load_weights(b / "student.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        diff = (wa[key] - wb[key]).abs().max().item()
        assert diff <= atol, (key, diff)


def test_pack_topk_round_trips_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 5, generator=g).to(torch.bfloat16)
    indices = torch.randint(0, 50_000, (2, 3, 5), generator=g, dtype=torch.int32)
    rest = torch.randn(2, 3, generator=g)
    v, i, r = unpack_topk(pack_topk(values, indices, rest))
    assert torch.equal(v, values.float()) and torch.equal(i, indices.long())
    assert torch.equal(r, rest)
    with pytest.raises(ValueError, match="2k \\+ 1 columns"):
        unpack_topk(torch.zeros(2, 4))


def test_pack_topk_takes_the_caches_uint16_ids() -> None:
    """A vocabulary of 32,769–65,536 ids (SmolLM2's 49,152) is cached as uint16, on which
    CPU torch has no ``max``: packing must not need it."""
    ids = torch.tensor([[49151, 40000, 3]], dtype=torch.uint16)
    _, i, _ = unpack_topk(pack_topk(torch.zeros(1, 3), ids, torch.zeros(1)))
    assert i.tolist() == [[49151, 40000, 3]]


def test_topk_loss_at_full_vocabulary_is_the_dense_divergence() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 6, 11, generator=g), 3 * torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[1, 3:] = IGNORE_INDEX
    packed = pack_topk(*topk_log_probs(teacher, 11))
    loss = TopKTokenKDLoss("jsd", beta=0.3, temperature=2.0)(student, packed, labels)
    dense = token_divergence(student, teacher, "jsd", beta=0.3, temperature=2.0, labels=labels)
    assert loss.item() == pytest.approx(dense.item(), rel=1e-5)


def test_cache_at_full_vocabulary_trains_the_live_teachers_student(tmp_path: Path) -> None:
    live = tmp_path / "live"
    run_lm(_config(live))
    cached = tmp_path / "cached"
    cache = [f"distill.cache_dir={tmp_path / 'cache'}", f"distill.cache_topk={VOCAB}"]
    result = run_lm(_config(cached, *cache, "distill.cache_dtype=float32"))
    info = result.summary["teacher_cache"]
    assert info["built"] and info["k"] == VOCAB and info["rows"] == 16
    assert info["bytes_per_token"] == VOCAB * (4 + 2) + 4  # float32 values, int16 ids
    assert _step_losses(cached) == pytest.approx(_step_losses(live), abs=1e-6)
    _assert_same_weights(live, cached, atol=ATOL)
    # a second run opens the cache instead of running the teacher
    run = build_lm_run(_config(tmp_path / "again", *cache, "distill.cache_dtype=float32"))
    assert run.info["teacher_cache"]["built"] is False
    assert run.distiller.teacher is None  # no live teacher in the training loop


def test_small_k_cache_holds_the_teachers_top_k_and_trains(tmp_path: Path) -> None:
    k = 8
    cfg = _config(
        tmp_path / "run", f"distill.cache_dir={tmp_path / 'cache'}", f"distill.cache_topk={k}"
    )
    run = build_lm_run(cfg)
    assert run.info["teacher_cache"]["bytes_per_token"] == k * (2 + 2) + 4  # float16, int16
    # the batch's cached teacher is the live teacher's top-k on the same (padded) batch
    batch = next(iter(run.train_loader))
    assert run.teacher is not None
    with torch.no_grad():
        logits = output_logits(call_model(run.teacher.eval(), batch["inputs"]))
    values, indices, rest = unpack_topk(batch[f"teacher.{TOPK}"])
    ref_values, ref_indices, ref_rest = topk_log_probs(logits, k)
    real = batch["inputs"]["attention_mask"].bool()  # padding positions are never counted
    assert torch.allclose(values[real], ref_values[real], atol=1e-2)  # float16 log-probs
    assert torch.equal(indices[real], ref_indices[real])
    assert torch.allclose(rest[real], ref_rest[real], atol=1e-5)  # float32

    result = run_lm(cfg)
    losses = _step_losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in losses)
    student = result.summary["student"]
    assert student["final"]["loss"] < student["initial"]["loss"]


def test_a_changed_teacher_or_damaged_cache_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_lm_run(_config(tmp_path / "a", f"distill.cache_dir={cache}", "distill.cache_topk=8"))
    other = _config(
        tmp_path / "b",
        f"distill.cache_dir={cache}",
        "distill.cache_topk=8",
        "teacher.config.intermediate_size=48",
    )
    with pytest.raises(ConfigError, match=r"distill\.cache_dir: .*stale.*teacher"):
        build_lm_run(other)
    with pytest.raises(ConfigError, match=r"distill\.cache_dir: .*\(k=8\).*\(k=16\)"):
        build_lm_run(_config(tmp_path / "c", f"distill.cache_dir={cache}", "distill.cache_topk=16"))
    manifest = json.loads((cache / MANIFEST).read_text())
    shard = cache / manifest["shards"][0]["files"][next(iter(manifest["tensors"]))]["file"]
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated
    with pytest.raises(ConfigError, match=r"distill\.cache_dir: .*(truncated|size|corrupt)"):
        build_lm_run(_config(tmp_path / "d", f"distill.cache_dir={cache}", "distill.cache_topk=8"))
    rebuild = _config(
        tmp_path / "e",
        f"distill.cache_dir={cache}",
        "distill.cache_topk=8",
        "teacher.config.intermediate_size=48",
        "distill.cache_rebuild=true",
    )
    assert build_lm_run(rebuild).info["teacher_cache"]["built"] is True
    build_lm_run(other)  # the rebuilt cache is the changed teacher's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("teacher", ["live", "cached"])
def test_two_process_ddp_matches_one_process(tmp_path: Path, teacher: str) -> None:
    extra = ["train.epochs=2"]
    if teacher == "cached":  # rank 0 builds the cache, rank 1 waits and opens it
        extra += [
            f"distill.cache_dir={tmp_path / 'cache'}",
            f"distill.cache_topk={VOCAB}",
            "distill.cache_dtype=float32",
        ]
    ddp = tmp_path / "ddp"
    args = [str(EXAMPLES / "tiny_token_kd.yaml")]
    for item in [f"output_dir={ddp}", f"data.text_file={TEXT}", "data.max_examples=20",
                 "train.progress=false", *extra]:  # fmt: skip
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

    one = tmp_path / "one"
    run_lm(_config(one, "train.epochs=2"))  # live teacher, one process
    assert json.loads((ddp / "summary.json").read_text())["processes"] == 2
    losses = _step_losses(ddp)
    assert len(losses) == 4 and losses == pytest.approx(_step_losses(one), abs=ATOL)
    _assert_same_weights(ddp, one, atol=ATOL)
