"""`kdistill lm` with ``train.parallel: fsdp`` under torchrun (FSDP2, 2 gloo processes on CPU).

The 2-process sharded run is checked against a 1-process run of the same config (same global
batches: per-step losses and final weights agree up to float summation order), its checkpoints
against the 1-process run's (full tensors, not shards), and a sharded resume from a mid-run
checkpoint against the uninterrupted sharded run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.checkpoint import latest_checkpoint, load_checkpoint, load_weights  # noqa: E402
from kdistill.config import ConfigError  # noqa: E402
from kdistill.lm.config import load_lm_config  # noqa: E402
from kdistill.lm.train import run_lm  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "lm"
TEXT = EXAMPLES / "tiny.txt"
ATOL = 2e-5
"""Float summation order differs (half-batch gradients reduce-scattered, sharded norms)."""
SETTINGS = [
    f"data.text_file={TEXT}",
    "data.max_examples=20",  # 16 training texts: 2 global batches of 8
    "train.progress=false",
    "train.epochs=2",
    "train.checkpoint_every=1",  # a mid-epoch checkpoint to resume from
]


def _step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= atol, (key, diff)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_lm(out: Path, *extra: str) -> None:
    args = [str(EXAMPLES / "tiny_token_kd.yaml")]
    for item in [f"output_dir={out}", *SETTINGS, "train.parallel=fsdp"]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "kdistill", "lm", *args, *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


def test_two_process_fsdp_matches_one_process_and_resumes(tmp_path: Path) -> None:
    fsdp = tmp_path / "fsdp"
    _torchrun_lm(fsdp)
    one = tmp_path / "one"
    run_lm(load_lm_config(EXAMPLES / "tiny_token_kd.yaml", [f"output_dir={one}", *SETTINGS]))

    summary = json.loads((fsdp / "summary.json").read_text())
    assert (summary["processes"], summary["parallel"]) == (2, "fsdp")
    losses = _step_losses(fsdp)
    assert len(losses) == 4 and losses == pytest.approx(_step_losses(one), abs=ATOL)
    _assert_close(
        load_weights(fsdp / "student.safetensors"), load_weights(one / "student.safetensors"), ATOL
    )
    hf = load_weights(fsdp / "student" / "model.safetensors")  # save_pretrained: full tensors
    _assert_close(hf, {k: v for k, v in load_weights(one / "student.safetensors").items() if k in hf}, ATOL)  # fmt: skip
    # checkpoints hold full weights and a full (name-keyed) optimizer state
    mid = "epoch-0001-step-000001"  # after epoch 1 and step 0 of epoch 2
    weights, state = load_checkpoint(fsdp / "checkpoints" / mid)
    ref_weights, ref_state = load_checkpoint(one / "checkpoints" / mid)
    _assert_close(weights, ref_weights, ATOL)
    moments = state["optimizer"]["state"]
    ref_moments = ref_state["optimizer"]["state"]
    assert len(moments) == len(ref_moments) and all(isinstance(k, str) for k in moments)
    embed = moments["model.embed_tokens.weight"]["exp_avg"]
    assert embed.shape == weights["student.model.embed_tokens.weight"].shape

    # resume the sharded run from its mid-epoch checkpoint: the uninterrupted sharded run
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints" / mid, resumed / "checkpoints" / mid)
    lines = (fsdp / "steps.jsonl").read_text().splitlines(keepends=True)
    (resumed / "steps.jsonl").write_text("".join(lines[:3]))  # 1 epoch + 1 step: global 3
    _torchrun_lm(resumed, "--resume")
    assert latest_checkpoint(resumed / "checkpoints").name == "epoch-0002"
    assert _step_losses(resumed) == pytest.approx(losses, abs=1e-6)
    _assert_close(
        load_weights(resumed / "student.safetensors"),
        load_weights(fsdp / "student.safetensors"),
        1e-6,
    )


def test_parallel_is_validated(tmp_path: Path) -> None:
    base = [f"output_dir={tmp_path}", f"data.text_file={TEXT}"]
    with pytest.raises(ConfigError, match=r"train\.parallel: 'fsd' is not allowed.*ddp, fsdp"):
        load_lm_config(EXAMPLES / "tiny_token_kd.yaml", [*base, "train.parallel=fsd"])
    with pytest.raises(ConfigError, match=r"train\.amp: fp16 .* parallel: fsdp"):
        load_lm_config(EXAMPLES / "tiny_token_kd.yaml", [*base, "train.parallel=fsdp", "train.amp=fp16"])  # fmt: skip
    cfg = load_lm_config(EXAMPLES / "tiny_token_kd.yaml", base)
    assert cfg.train.parallel == "ddp"
