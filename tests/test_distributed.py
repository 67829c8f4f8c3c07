"""Two-process DDP on CPU (gloo) trains the same student as one process (same global batch).

Runs ``python -m torch.distributed.run --nproc_per_node 2 -m kdistill run tiny.yaml`` (what
``torchrun`` runs) and ``python -m kdistill run tiny.yaml`` as subprocesses on a tiny MLP
teacher/student pair (no BatchNorm, whose per-rank statistics would differ by design).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from kdistill.checkpoint import latest_checkpoint
from kdistill.data import DatasetNotFoundError, find_fashion_mnist
from kdistill.data.loader import TensorBatchLoader

ATOL = 1e-5
"""Float summation order differs (the all-reduce sums two half-batch gradients)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(output_dir: Path) -> dict:
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"train_subset": 512, "test_subset": 128, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}},
        "student": {"model": "mlp", "kwargs": {"hidden": [32]}},
        "distill": {"temperature": 4.0, "alpha": 0.5},
        "optim": {"name": "adamw", "lr": 0.01, "schedule": "cosine"},
        "train": {"epochs": 2, "progress": False, "threads": 1, "device": "cpu"},
    }


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"


def test_loader_shares_partition_the_global_batches() -> None:
    x = torch.arange(20.0)[:, None]
    full = list(TensorBatchLoader(inputs=x, batch_size=8, shuffle=True, drop_last=True, seed=3))
    shares = [
        list(
            TensorBatchLoader(
                inputs=x, batch_size=8, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2
            )
        )
        for r in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == len(full) == 2
    for i, batch in enumerate(full):
        joined = torch.cat([shares[0][i]["index"], shares[1][i]["index"]])
        assert torch.equal(joined, batch["index"])
        assert shares[0][i]["inputs"].shape == (4, 1)
    with pytest.raises(ValueError, match="divisible"):
        TensorBatchLoader(inputs=x, batch_size=7, rank=0, world_size=2)


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    runs = {}
    for name in ("single", "ddp"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(tmp_path / name)))
        runs[name] = tmp_path / name
    run(["-m", "kdistill", "run", str(tmp_path / "single.yaml")], tmp_path)
    run(
        [
            "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "kdistill", "run", str(tmp_path / "ddp.yaml"),
        ],
        tmp_path,
    )  # fmt: skip

    single = safetensors.torch.load_file(runs["single"] / "student.safetensors")
    ddp = safetensors.torch.load_file(runs["ddp"] / "student.safetensors")
    assert single.keys() == ddp.keys()
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=ATOL), (
            key,
            (single[key] - ddp[key]).abs().max().item(),
        )
    ckpt = latest_checkpoint(runs["ddp"] / "checkpoints")
    ref = latest_checkpoint(runs["single"] / "checkpoints")
    assert ckpt is not None and ref is not None and ckpt.name == ref.name
    assert (
        safetensors.torch.load_file(ckpt / "model.safetensors").keys()
        == safetensors.torch.load_file(ref / "model.safetensors").keys()
    )

    def rows(name: str) -> list[dict]:
        lines = (runs[name] / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    for a, b in zip(rows("single"), rows("ddp"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=ATOL)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-9)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)
    steps = {n: (runs[n] / "steps.jsonl").read_text().splitlines() for n in runs}
    assert len(steps["single"]) == len(steps["ddp"]) == 2 * 512 // 64
    for a, b in zip(steps["single"], steps["ddp"], strict=True):
        assert json.loads(a)["loss"] == pytest.approx(json.loads(b)["loss"], abs=ATOL)
    assert json.loads((runs["ddp"] / "summary.json").read_text())["train_samples"] == 512


def test_two_process_scheme_run_matches_one_process(tmp_path: Path) -> None:
    """A scheme file (Mean Teacher: an EMA teacher updated by a Trainer callback after each
    optimizer step) under torchrun trains the same student and EMA teacher as one process."""
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    runs = {}
    for name in ("single", "ddp"):
        cfg = tiny_config(tmp_path / name)
        del cfg["teacher"], cfg["distill"]
        cfg["scheme"] = {
            "name": "mean_teacher",
            "mean_teacher": {"labelled_fraction": 1.0, "augment_views": False, "momentum": 0.9},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        runs[name] = tmp_path / name
    run(["-m", "kdistill", "run", str(tmp_path / "single.yaml")], tmp_path)
    run(
        [
            "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "kdistill", "run", str(tmp_path / "ddp.yaml"),
        ],
        tmp_path,
    )  # fmt: skip
    for weights in ("student.safetensors", "ema_teacher.safetensors"):
        single = safetensors.torch.load_file(runs["single"] / weights)
        ddp = safetensors.torch.load_file(runs["ddp"] / weights)
        assert single.keys() == ddp.keys()
        for key in single:
            diff = (single[key] - ddp[key]).abs().max().item()
            assert diff <= ATOL, (weights, key, diff)
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert summary["scheme"]["name"] == "mean_teacher"
    steps = {n: (runs[n] / "steps.jsonl").read_text().splitlines() for n in runs}
    assert len(steps["single"]) == len(steps["ddp"]) == 2 * 512 // 64
