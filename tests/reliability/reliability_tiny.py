"""A tiny distillation run (MLPs on Gaussian blobs) for the reliability tests: ~0.1 s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.config import OptimConfig
from kdistill.data.loader import TensorBatchLoader
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.trainer import Trainer

DIM, CLASSES, N, BATCH = 8, 3, 48, 8  # 6 steps per epoch
STEPS_PER_EPOCH = N // BATCH


def data(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    centres = 3.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, DIM, generator=g), y


def distiller(extra: list[LossTerm] | None = None, student_seed: int = 0) -> Distiller:
    torch.manual_seed(100)
    teacher = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    torch.manual_seed(student_seed)
    student = nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, CLASSES))
    terms = [
        LossTerm("kd", KDLoss(2.0), 0.5),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 0.5, teacher=None),
        *(extra or []),
    ]
    return Distiller(student, terms, teacher=teacher)


def config(**train: Any) -> dict[str, Any]:
    """A plain run config (what ExperimentConfig.to_dict() gives, abridged)."""
    return {
        "seed": 0,
        "output_dir": "unused",
        "data": {"batch_size": BATCH, "eval_batch_size": 64, "num_workers": 0},
        "distill": {"temperature": 2.0, "alpha": 0.5},
        "optim": {"name": "adamw", "lr": 1e-2, "schedule": "cosine", "grad_clip": 5.0},
        "train": {"epochs": 2, "progress": False, "threads": None, "device": "cpu", **train},
    }


def trainer(
    output_dir: Path,
    epochs: int = 2,
    cfg: dict[str, Any] | None = None,
    extra: list[LossTerm] | None = None,
    student_seed: int = 0,
    cls: type[Trainer] = Trainer,
    grad_clip: float | None = 5.0,
    **kwargs: Any,
) -> Trainer:
    x, y = data()
    test_x, test_y = data(24, seed=1)
    train = TensorBatchLoader(x, y, batch_size=BATCH, shuffle=True, drop_last=True, seed=0)
    test = TensorBatchLoader(test_x, test_y, batch_size=64)
    optim = OptimConfig(name="adamw", lr=1e-2, schedule="cosine", grad_clip=grad_clip)
    return cls(
        distiller(extra, student_seed), train, test, optim, epochs, output_dir,
        progress=False, config=cfg, **kwargs,
    )  # fmt: skip


def student_state(t: Trainer) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in t.distiller.student.state_dict().items()}


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
