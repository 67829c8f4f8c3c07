"""FSDP2 on CPU (gloo): a 2-process sharded LM distillation run matches the 1-process run.

The test starts this file as a script under ``python -m torch.distributed.run
--nproc_per_node 2`` (what ``torchrun`` runs): each rank shards a tiny
``transformers.LlamaForCausalLM`` student with :func:`kdistill.distributed.shard_student`
(each decoder layer a unit, the frozen teacher unwrapped) and takes
:func:`lm_distill_step` s (a hand-written step, below) on its half of each global batch. The
reference is the same steps on the whole batch in one process, unsharded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdistill import distributed
from kdistill.distiller import output_logits

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else None

ATOL = 2e-5
"""Float summation order differs (reduce-scattered half-batch gradients, sharded clipping)."""
STEPS = 6
GLOBAL_BATCH = 4


def lm_distill_step(  # a hand-written reference step, independent of the Trainer
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    attention_mask: torch.Tensor | None = None,
    grad_clip: float | None = 1.0,
    **divergence: Any,
) -> float:
    """One distillation step of a causal LM on this rank's share of a global batch.

    The loss is :func:`kdistill.lm.token_divergence` between the student's and the frozen
    teacher's logits ``(b, T, V)`` at every counted position (``attention_mask``), averaged
    over the counted tokens of the **global** batch: each rank's summed divergence is divided
    by ``N_tokens / world_size``, so the gradient average FSDP's reduce-scatter (or DDP's
    all-reduce) takes is the gradient of the global token mean, whatever the padding per rank.
    An N-process step therefore equals the one-process step on the whole batch up to float
    summation order.

    Args:
        student: the (sharded) student returning logits or an object with ``.logits``.
        teacher: the frozen teacher; run under ``torch.inference_mode``.
        input_ids: this rank's ``(b, T)`` token ids (see :func:`rank_share`).
        optimizer: over the student's (sharded) parameters.
        attention_mask: ``(b, T)``; positions with 0 do not count (and are masked in both
            models).
        grad_clip: max global gradient norm, or ``None``.
        divergence: ``kind``, ``temperature``, ``beta``, ... for ``token_divergence``.

    Returns:
        The global mean loss of the step (the same on every rank).
    """
    from kdistill.lm import token_divergence

    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.inference_mode():
        teacher_logits = output_logits(teacher(input_ids, **kwargs))  # (b, T, V)
    teacher_logits = teacher_logits.clone()  # out of inference mode, usable by autograd
    student_logits = output_logits(student(input_ids, **kwargs))  # (b, T, V)
    mask = None if attention_mask is None else attention_mask.bool()
    counted = input_ids.numel() if mask is None else mask.sum()
    counted = torch.as_tensor(counted, dtype=torch.float64, device=input_ids.device)
    total_tokens = float(distributed.all_sum(counted).item())
    loss_sum = token_divergence(
        student_logits, teacher_logits, mask=mask, reduction="sum", **divergence
    )
    loss = loss_sum * (distributed.world_size() / max(total_tokens, 1.0))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not torch.isfinite(norm):
            raise FloatingPointError(f"non-finite gradient norm {norm.item()}")
    optimizer.step()
    return float(distributed.all_sum(loss_sum.detach()).item() / max(total_tokens, 1.0))


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
        loss = lm_distill_step(
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
    # Both ranks are done; leave without gloo's teardown, which on a loaded machine can abort
    # a rank at exit after the work ("terminate called without an active exception": once in
    # a fresh-clone CI run, even with distributed.destroy's barrier). The test checks outputs.
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


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
