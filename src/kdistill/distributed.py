"""Multi-process data parallelism under ``torchrun`` (DDP), kept to a few helpers.

``torchrun --nproc_per_node N -m kdistill run CONFIG.yaml`` starts N copies of the run with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. :func:`init_from_env` turns that into a process group (``gloo`` on CPU,
``nccl`` on CUDA); without ``WORLD_SIZE > 1`` it does nothing and every helper here answers
as a single process would, so the same code runs with and without torchrun.

How the work is split (see :class:`~kdistill.data.loader.TensorBatchLoader`): ``data.batch_size``
stays the *global* batch; every rank draws the same per-epoch permutation and takes an equal,
contiguous share of each global batch. The :class:`~kdistill.trainer.Trainer` wraps the
trainable parts (student and loss-term adapters; the frozen teacher stays outside) in
:class:`~torch.nn.parallel.DistributedDataParallel`, whose gradient all-reduce averages the
per-rank mean-loss gradients: the gradient of the mean loss over the global batch. An N-process
run therefore trains the same student as a one-process run of the same config, up to float
summation order (students with BatchNorm differ more: each rank normalises with its own share's
statistics). Only rank 0 writes checkpoints, logs and the final weights.

Language-model students can instead be sharded with FSDP2 (:func:`shard_student`,
:func:`full_state_dict`; see the section at the end of this module), trained by the same
:class:`~kdistill.trainer.Trainer` as everything else.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes; returns ``(rank, world_size)``.

    Idempotent; ``(0, 1)`` and no process group when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(destroy)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the process that writes files."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a copy; ``tensor`` itself when single-process)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    return bool(all_sum(torch.tensor(int(flag), device=device)).item() == world_size())


def destroy() -> None:
    """Tear the process group down together: a rank that destroys its gloo context while
    another still runs collectives (e.g. rank 0 saving after the last step) can abort the
    other with "terminate called without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- FSDP for language models ---------------------------------------------------------------
#
# DDP keeps a full copy of the student (and its optimizer state) on every rank. For a language
# model student that is most of the memory, so :func:`shard_student` shards it with FSDP2
# (``torch.distributed.fsdp.fully_shard``): each rank keeps 1/N of every parameter, gradient
# and optimizer state, and all-gathers a block's parameters just before it runs. The frozen
# teacher is not wrapped by default: it needs no gradients or optimizer state, and every rank
# runs it on its own share of the batch; :func:`shard_teacher` shards it too (inference only),
# when it does not fit whole on one device (``teacher.parallel: fsdp`` in ``kdistill lm``).
# FSDP2 runs on CPU with gloo (what the CI test uses) as on CUDA with nccl.


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the elements of its ``nn.ModuleList`` s.

    For Hugging Face causal LMs these are the decoder layers (``model.model.layers``), the
    usual FSDP unit: each is all-gathered just before it runs and freed after.
    """
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def shard_student(
    student: nn.Module,
    blocks: Sequence[nn.Module] | None = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Shard ``student`` in place with FSDP2 over all ranks; returns it.

    Args:
        student: the trainable model, on this rank's device, before the optimizer is built
            (the optimizer must see the sharded parameters).
        blocks: the submodules to shard as units (each all-gathered on its own); ``None``:
            :func:`default_blocks`. The root gets the rest (embeddings, final norm, head, and
            tied weights, which must stay in one unit).
        fsdp_kwargs: passed to ``fully_shard`` (``mesh``, ``reshard_after_forward``,
            ``mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)``, ...).

    Raises:
        RuntimeError: when no process group is initialised (use :func:`init_from_env`).
    """
    return _shard_blocks_then_root(student, blocks, "shard_student", {}, {}, fsdp_kwargs)


def _shard_blocks_then_root(
    model: nn.Module,
    blocks: Sequence[nn.Module] | None,
    caller: str,
    block_kwargs: dict[str, Any],
    root_kwargs: dict[str, Any],
    fsdp_kwargs: dict[str, Any],
) -> nn.Module:
    """``fully_shard`` each block (default :func:`default_blocks`), then the root."""
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{caller} needs a process group: start with torchrun and call "
            "kdistill.distributed.init_from_env() first"
        )
    for block in default_blocks(model) if blocks is None else blocks:
        fully_shard(block, **block_kwargs, **fsdp_kwargs)
    fully_shard(model, **root_kwargs, **fsdp_kwargs)
    return model


def shard_teacher(
    teacher: nn.Module,
    blocks: Sequence[nn.Module] | None = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Shard a frozen teacher in place with FSDP2 over all ranks, for inference only.

    As :func:`shard_student` (``fully_shard`` per block, then the root) for a model that takes
    no gradient and has no optimizer: its parameters are frozen and it is put in eval mode.
    Each rank keeps 1/N of every parameter; a forward all-gathers one block at a time and
    frees it after (``reshard_after_forward=True`` for the blocks), so the whole teacher never
    sits on one rank. The root's own parameters (embeddings, final norm, ``lm_head``) stay
    gathered after a forward, so that a fused loss can read the ``lm_head`` weight, until
    :func:`reshard` frees them. Every rank must run the teacher's forwards in step (the same
    number of calls, as for any FSDP model); evaluate it under ``no_grad``, not
    ``inference_mode`` (FSDP2 reuses its all-gather buffers across forwards).

    Raises:
        RuntimeError: when no process group is initialised (use :func:`init_from_env`).
    """
    if dist.is_available() and dist.is_initialized():
        teacher.requires_grad_(False).eval()
    return _shard_blocks_then_root(
        teacher,
        blocks,
        "shard_teacher",
        {"reshard_after_forward": True},
        {"reshard_after_forward": False},
        fsdp_kwargs,
    )


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 model (:func:`shard_teacher`'s root after a
    forward); nothing for a model that is not sharded."""
    if is_sharded(model):
        model.reshard()  # type: ignore[operator]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU, on rank 0; ``{}`` on other ranks.

    Works for FSDP-sharded and plain models alike (a plain model's own state dict, on CPU).
    Every rank must call it (the shards are all-gathered).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed():
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2 (``fully_shard``, e.g. :func:`shard_student`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded ``DTensor`` all-gathered into a plain tensor (every rank must call it); a
    plain tensor as it is."""
    gather = getattr(tensor, "full_tensor", None)
    return tensor if gather is None else gather()


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full (unsharded) optimizer state of an FSDP-sharded ``model`` on CPU, on rank 0.

    Keyed by parameter name (not index), as
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` writes it; other
    ranks get no tensors. Every rank must call it (the shards are all-gathered).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full (unsharded) weights, and optionally optimizer state from
    :func:`full_optimizer_state_dict`, into an FSDP-sharded ``model`` (and its ``optimizer``).

    Every rank passes the full tensors (each keeps its own shard of them). Strict: a missing
    or unexpected key raises ``RuntimeError``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def rank_share(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch ``(B, ...)`` (``B`` divisible by N)."""
    n = world_size()
    if tensor.shape[0] % n:
        raise ValueError(
            f"the global batch of {tensor.shape[0]} rows does not split into {n} equal shares"
        )
    return tensor.tensor_split(n)[rank()]
