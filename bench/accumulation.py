"""Gradient accumulation equals one big batch, on a real ``kdistill lm`` run.

Runs ``examples/lm/tiny_token_kd.yaml`` twice through the CLI — batches of 8 texts, and
micro-batches of 4 with ``train.accumulate_steps: 2`` — with the same seed and data order, and
prints the per-step losses side by side and the largest difference of the final weights.

    OMP_NUM_THREADS=1 python bench/accumulation.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from kdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "lm" / "tiny_token_kd.yaml"


def run(out: Path, batch: int, accumulate: int) -> tuple[list[float], dict]:
    args = ["lm", str(CONFIG), f"--set=output_dir={out}", f"--set=data.batch_size={batch}"]
    args += [f"--set=train.accumulate_steps={accumulate}", "--set=train.progress=false"]
    args += ["--set=optim.grad_clip=null"]  # clipping acts on the whole step either way
    assert main(args) == 0
    steps = [json.loads(line)["loss"] for line in (out / "steps.jsonl").open()]
    return steps, load_file(str(out / "student.safetensors"))


def main_() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        big, w_big = run(Path(tmp) / "big", 8, 1)
        acc, w_acc = run(Path(tmp) / "acc", 4, 2)
    print("step  loss (batch 8)  loss (4 x 2 accumulated)")
    for i, (a, b) in enumerate(zip(big, acc, strict=True)):
        print(f"{i:4d}  {a:.8f}      {b:.8f}")
    loss_diff = max(abs(a - b) for a, b in zip(big, acc, strict=True))
    weight_diff = max((w_big[k] - w_acc[k]).abs().max().item() for k in w_big)
    print(
        f"steps: {len(big)} vs {len(acc)}; max |loss diff| {loss_diff:.2e}; "
        f"max |weight diff| {weight_diff:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main_())
