"""Side-by-side comparison of a teacher and its students: accuracy, size, latency.

What users of a distillation tool want to see in one table: how much accuracy each student
keeps, how many times smaller it is, and how much faster it answers on *this* machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.models import count_parameters


@dataclass
class ModelRow:
    """One model's measured figures."""

    name: str
    test_accuracy: float
    parameters: int
    size_bytes: int
    latency_ms: float  # median wall time of one forward over a batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def measure_latency(model: nn.Module, example: Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``model(example)`` in eval mode, after ``warmup`` calls.

    The median resists the occasional scheduler hiccup better than the mean on a shared CPU.
    """
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    return statistics.median(times)


def model_row(
    name: str,
    model: nn.Module,
    accuracy: float,
    weights_file: str | Path,
    example: Tensor,
    repeats: int = 30,
) -> ModelRow:
    return ModelRow(
        name=name,
        test_accuracy=accuracy,
        parameters=count_parameters(model),
        size_bytes=Path(weights_file).stat().st_size,
        latency_ms=measure_latency(model, example, repeats=repeats),
    )


def comparison_table(rows: list[ModelRow], reference: ModelRow, batch_size: int) -> str:
    """A Markdown table; ratios are relative to ``reference`` (the teacher)."""
    header = (
        f"| model | test acc. | % of teacher acc. | params | compression | size on disk "
        f"| latency / batch of {batch_size} | speed-up |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        lines.append(
            f"| {row.name} | {100 * row.test_accuracy:.2f} % "
            f"| {100 * row.test_accuracy / reference.test_accuracy:.1f} % "
            f"| {row.parameters:,} | {reference.parameters / row.parameters:.1f}× "
            f"| {_human_bytes(row.size_bytes)} | {row.latency_ms:.2f} ms "
            f"| {reference.latency_ms / row.latency_ms:.1f}× |"
        )
    return header + "\n".join(lines) + "\n"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover
