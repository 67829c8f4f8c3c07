"""Train the demo's Fashion-MNIST teacher and ship it inside the package.

    python bench/train_teacher.py            # ≈ 10–15 min on 2 CPU cores

Runs ``src/kdistill/configs/fashion_mnist_teacher.yaml`` through ``kdistill run``'s code
path, then copies the weights to ``src/kdistill/assets/fashion_mnist_teacher.safetensors``
with a JSON card (architecture, test accuracy, command, commit, seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kdistill.checkpoint import atomic_write, atomic_write_text
from kdistill.config import load_config
from kdistill.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src/kdistill/configs/fashion_mnist_teacher.yaml"
ASSETS = ROOT / "src/kdistill/assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="fashion_mnist_teacher")
    args = parser.parse_args()
    cfg = load_config(CONFIG, args.set)
    result = run_experiment(cfg)
    weights = result.fit.student_path
    target = ASSETS / f"{args.name}.safetensors"
    atomic_write(target, lambda tmp: shutil.copyfile(weights, tmp))
    card = {
        "model": cfg.student.model,
        "kwargs": cfg.student.kwargs,
        "parameters": result.summary["student"]["parameters"],
        "test_accuracy": result.summary["student"]["test_accuracy"],
        "epochs": cfg.train.epochs,
        "train_seconds": round(result.summary["seconds"], 1),
        "command": " ".join(["python", "bench/train_teacher.py", *sys.argv[1:]]),
        "config": str(CONFIG.relative_to(ROOT)),
        "commit": _commit(),
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
    }
    atomic_write_text(ASSETS / f"{args.name}.json", json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
