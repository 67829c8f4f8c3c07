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
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
