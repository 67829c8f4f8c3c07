"""LoRA student vs full student, token-level KD from SmolLM2-135M-Instruct on chat data (CPU).

Both arms are real ``kdistill lm`` runs, each in a fresh process (its peak resident memory is
the ``ru_maxrss`` that ``os.wait4`` reports for it), from the same config but for the student:

* ``full``: a 6-layer copy of the teacher (layers 0, 6, 12, 18, 24, 29, embeddings and the
  tied head; :func:`kdistill.lm.student_init.init_student_from_teacher`), every weight trained.
* ``lora``: the same copy, frozen, with LoRA adapters (Hu et al. 2021) of rank ``--rank`` on
  every linear layer but the head (``student.lora: {target_modules: all-linear}``).
* ``lora_gc`` (``--arms``): ``lora`` with ``student.gradient_checkpointing: true``.

Data: chat records built from WordNet (Debian ``wordnet-base``): a user asks what a noun or
verb means, the assistant answers with its gloss (usage examples stripped), e.g.
``{"messages": [{"role": "user", "content": "What does \\"entity\\" mean?"}, {"role":
"assistant", "content": "That which is perceived or known ... ."}]}``. ``--records``
synsets are drawn with seed 0; they are rendered with SmolLM2's chat template (which adds
its default system turn) and the loss and the KD term count the assistant tokens only
(``data.file``, :mod:`kdistill.lm.data`). ``eval_fraction`` of them is held out.

Objective: ``0.5 · KL(teacher ‖ student) + 0.5 · CE`` per assistant token (T = 1), AdamW,
cosine schedule, ``--epochs`` epochs of batches of ``--batch-size``. The learning rates
differ by arm (``--lr-full``, ``--lr-lora``: LoRA is usually run with a ~10× larger rate).

Reported per arm (``--out`` JSON and a Markdown table on stdout): trainable and total
parameters, peak RSS of the run's process, training seconds, held-out per-token loss and
perplexity on the assistant tokens before and after training, and the teacher's.

Setup: ``bash bench/setup_lm_teachers.sh``. Run::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_vs_full.py \\
        --out bench/results/lora_vs_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("full", "lora", "lora_gc")
LAYER_MAP = [0, 6, 12, 18, 24, 29]
DATA_KEYS = ("records", "train_examples", "eval_examples", "target_tokens", "sha256")
_QUOTED = re.compile(r';?\s*"[^"]*"')


def wordnet_chats(folder: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chat records "What does X mean?" → X's WordNet gloss, drawn with ``seed``."""
    pairs = []
    for pos in ("noun", "verb"):
        for line in (folder / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # the licence header
            head, gloss = line.split(" | ", 1)
            lemma = head.split()[4].replace("_", " ")
            definition = _QUOTED.sub("", gloss).strip().rstrip(";").strip()
            if lemma.isascii() and 20 <= len(definition) <= 160:
                pairs.append((lemma, definition))
    chosen = random.Random(seed).sample(pairs, n)
    return [
        {
            "messages": [
                {"role": "user", "content": f'What does "{lemma}" mean?'},
                {"role": "assistant", "content": definition[0].upper() + definition[1:] + "."},
            ]
        }
        for lemma, definition in chosen
    ]


def arm_config(arm: str, data_file: Path, out: Path, args: argparse.Namespace) -> dict:
    student: dict[str, Any] = {"init_from_teacher": True, "layer_map": LAYER_MAP}
    if arm != "full":
        student["lora"] = {"r": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"}
    if arm == "lora_gc":
        student["gradient_checkpointing"] = True
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {
            "file": str(data_file),
            "max_length": args.max_length,
            "min_tokens": 2,
            "batch_size": args.batch_size,
            "eval_batch_size": 16,
            "eval_fraction": args.eval_fraction,
        },
        "teacher": {"pretrained": "smollm2"},
        "student": student,
        "distill": {"objective": "token_kd", "divergence": "forward_kl", "alpha": 0.5},
        "optim": {
            "name": "adamw",
            "lr": args.lr_full if arm == "full" else args.lr_lora,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "grad_clip": 1.0,
        },
        "train": {
            "epochs": args.epochs,
            "threads": args.threads,
            "progress": False,
            "tensorboard": False,
        },
    }


def run_arm(config: Path) -> dict[str, float]:
    """``kdistill lm CONFIG`` in a fresh process: its wall and CPU (user + system) seconds,
    peak RSS (bytes; ``ru_maxrss`` is in KiB on Linux) and exit code."""
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kdistill", "lm", str(config)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_seconds": time.perf_counter() - began,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss": usage.ru_maxrss * 1024,
        "exit_code": proc.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default="full,lora", help=f"comma-separated, of {ARMS}")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr-full", type=float, default=2e-4)
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wordnet", default="/usr/share/wordnet")
    parser.add_argument("--workdir", default="runs/bench_lora_vs_full")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {ARMS}")

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / "wordnet_chat.jsonl"
    chats = wordnet_chats(Path(args.wordnet), args.records)
    data_file.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    report: dict[str, Any] = {
        "args": vars(args),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "arms": {},
    }
    for arm in arms:
        out = work / arm
        config = work / f"{arm}.yaml"
        config.write_text(json.dumps(arm_config(arm, data_file, out, args), indent=1))
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        process = run_arm(config)
        if process["exit_code"] != 0:
            print(f"{arm}: kdistill lm exited {process['exit_code']}", file=sys.stderr)
            return int(process["exit_code"])
        summary = json.loads((out / "summary.json").read_text())
        student = summary["student"]
        report["arms"][arm] = {
            "trainable_parameters": student["trainable_parameters"],
            "parameters": student["parameters"],
            "peak_rss_mib": process["peak_rss"] / 2**20,
            "process_wall_seconds": process["wall_seconds"],
            "process_cpu_seconds": process["cpu_seconds"],
            "train_seconds": summary["train_seconds"],
            "initial": {k: student["initial"][k] for k in ("loss", "perplexity")},
            "final": {k: student["final"][k] for k in ("loss", "perplexity")},
            "teacher": {k: summary["teacher"]["eval"][k] for k in ("loss", "perplexity")},
            "data": {k: summary["data"][k] for k in DATA_KEYS},
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(
        "| arm | trainable params | peak RSS | process CPU s | held-out loss (ppl): init → final |"
    )
    print("| --- | ---: | ---: | ---: | --- |")
    for arm, r in report["arms"].items():
        init, final = r["initial"], r["final"]
        print(
            f"| {arm} | {r['trainable_parameters']:,} of {r['parameters']:,} | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['process_cpu_seconds']:.0f} | "
            f"{init['loss']:.3f} ({init['perplexity']:.1f}) → {final['loss']:.3f} "
            f"({final['perplexity']:.1f}) |"
        )
    teacher = next(iter(report["arms"].values()))["teacher"]
    print(f"teacher held-out loss {teacher['loss']:.3f} (perplexity {teacher['perplexity']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
