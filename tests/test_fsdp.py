"""FSDP2 on CPU (gloo): a 2-process sharded LM distillation run matches the 1-process run.

The test starts this file as a script under ``python -m torch.distributed.run
--nproc_per_node 2`` (what ``torchrun`` runs): each rank shards a tiny
``transformers.LlamaForCausalLM`` student with :func:`kdistill.distributed.shard_student`
(each decoder layer a unit, the frozen teacher unwrapped) and takes
:func:`kdistill.distributed.lm_distill_step` s on its half of each global batch. The
reference is the same steps on the whole batch in one process, unsharded.
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

from kdistill import distributed

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else None

ATOL = 2e-5
"""Float summation order differs (reduce-scattered half-batch gradients, sharded clipping)."""
STEPS = 6
GLOBAL_BATCH = 4


def build_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(hidden: int, layers: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32, attn_implementation="eager",
        )  # fmt: skip

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config(32, 2)).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # peaked next-token distributions, a loss far from 0
    student = LlamaForCausalLM(config(16, 2))
    return student, teacher


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(8, 12)`` and an attention mask with right padding of varying length."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2 * GLOBAL_BATCH, 12), generator=g)
    lengths = torch.tensor([12, 7, 12, 3, 10, 12, 5, 9])  # unequal counted tokens per rank
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return ids, mask


def train(sharded: bool) -> tuple[dict[str, torch.Tensor], list[float]]:
    student, teacher = build_models()
    if sharded:
        distributed.shard_student(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids, mask = batches()
    losses = []
    for step in range(STEPS):
        rows = slice((step % 2) * GLOBAL_BATCH, (step % 2 + 1) * GLOBAL_BATCH)
        ids_b, mask_b = ids[rows], mask[rows]
        if sharded:
            ids_b, mask_b = distributed.rank_share(ids_b), distributed.rank_share(mask_b)
        loss = distributed.lm_distill_step(
            student, teacher, ids_b, optimizer, attention_mask=mask_b, grad_clip=0.5,
            kind="jsd", temperature=2.0,
        )  # fmt: skip
        losses.append(loss)
    return distributed.full_state_dict(student), losses


def main(out: str) -> None:
    import safetensors.torch

    torch.set_num_threads(1)
    distributed.init_from_env()
    weights, losses = train(sharded=True)
    if distributed.is_main():
        safetensors.torch.save_file(weights, os.path.join(out, "student.safetensors"))
        Path(out, "losses.json").write_text(json.dumps(losses))
    distributed.destroy()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_fsdp_lm_distillation_matches_one_process(tmp_path: Path) -> None:
    import safetensors.torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        __file__, str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    reference, ref_losses = train(sharded=False)
    fsdp = safetensors.torch.load_file(tmp_path / "student.safetensors")
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert fsdp.keys() == reference.keys()
    for key in reference:
        diff = (fsdp[key] - reference[key]).abs().max().item()
        assert diff <= ATOL, (key, diff)
    assert losses == pytest.approx(ref_losses, abs=ATOL)
    assert losses[-2] < losses[0] and losses[-1] < losses[1]  # same batches, lower loss


def test_shard_student_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs a process group"):
        distributed.shard_student(torch.nn.Linear(2, 2))


if __name__ == "__main__":
    main(sys.argv[1])
