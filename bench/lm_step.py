"""One LM distillation training step, side by side: peak memory and tokens/s of each loss path.

    python bench/lm_step.py                        # full run: V = 49,152, batch 4 x 128, 30 steps
    python bench/lm_step.py --steps 2 --warmup 1 --vocab 4096 --batch 2 --seq 32 --layers 1 1
    python bench/lm_step.py --trl-python /path/to/trl-venv/bin/python   # + the optional TRL arm

The same random Llama teacher and student (tied embeddings like SmolLM2; hidden 576 as in
``bench/lm_loss_memory.py``'s issue-6 shape) and the same random batches train the student
with AdamW for ``--steps`` timed steps after ``--warmup`` untimed ones, once per variant, each
variant in a fresh subprocess with one thread:

* ``plain_old`` — student logits + :func:`kdistill.lm.token_divergence` with the old default
  chunk of ``DEFAULT_CHUNK_ELEMENTS // V`` rows (341 at V = 49,152);
* ``budget`` — the same with the new default, chunks sized by ``chunk_bytes`` (32 MiB);
* ``fused`` — :func:`kdistill.lm.fused.fused_linear_divergence` on the student's last hidden
  states and ``lm_head.weight`` (no student logits), teacher logits from its full forward;
* ``fused_teacher_hidden`` — the same with the teacher as (hidden states, ``lm_head.weight``):
  neither model's ``(tokens x V)`` logits exist anywhere in the step;
* ``ce`` — cross-entropy only (the student's own cost floor);
* ``topk`` / ``fused_topk`` — a cached top-k teacher (``--k``, computed before the timed loop
  and the teacher deleted): :func:`kdistill.lm.topk.topk_divergence` on student logits vs
  :func:`kdistill.lm.fused.fused_topk_divergence` on hidden states;
* ``lm_default`` / ``lm_default_topk`` — what ``kdistill lm`` token KD trains at its defaults
  (``distill.fused: auto``): :class:`kdistill.lm.fused_run.FusedTokenKD`, the model the Trainer
  runs, with the live teacher (its hidden states and ``lm_head``) or the cached top-k, the
  divergence JSD ``--beta`` and ``alpha = 1`` (KD alone, as TRL's GKD loss; ``--lm-alpha``),
  chunks from the default byte budget (``chunk_bytes`` unset);
* ``trl`` / ``trl_gc`` (only with ``--trl-python``, a venv with ``trl``; kdistill is not
  needed there) — TRL's GKD trainer itself: ``GKDTrainer(...).train()`` on the same models,
  batches (in order) and AdamW, ``lmbda = 0`` (no on-policy generation), the same ``beta``,
  temperature 1, float32; ``trl_gc`` with TRL's SFT default ``gradient_checkpointing: true``
  (:func:`run_trl_child`). Its step time covers the whole Trainer loop.

Peak memory is the process's resident high-water mark over the timed steps (``VmHWM`` /
``ru_maxrss``, reset through ``/proc/self/clear_refs`` after set-up and around each
``AdamW.step``), measured over forward + backward (also shown above the resident size before
the first timed step: the models, the AdamW state and the cached top-k) and over the whole
step including ``AdamW.step``, whose own temporaries (one per parameter, e.g. the tied
49,152 x 576 embedding, unless ``--adamw-fused``) can set the peak when the loss is lean. Minor page faults and system time per step come from
``resource.getrusage``. Every variant prints its per-step losses; the table reports the
largest difference from ``budget`` (dense KD variants), ``lm_default`` (TRL) or ``topk``
(top-k variants); the last lines give ``lm_default`` against each TRL arm (the issue-18
goals: ≥ 1.5× the tokens/s at ≤ 0.5× the peak, losses equal to 1e-6). ``--interleave ce
lm_default_topk`` times variants step by step in one process (drift-free time ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DENSE = ("plain_old", "budget", "fused", "fused_teacher_hidden")
TOPK = ("topk", "fused_topk", "lm_default_topk")
VARIANTS = (*DENSE, "lm_default", "ce", *TOPK)
TRL = ("trl", "trl_gc")  # only with --trl-python: TRL's GKDTrainer.train(), its own venv
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


# --------------------------------------------------------------------------- set-up (parent)


def build_models(args: argparse.Namespace, folder: Path) -> None:
    """Save the random teacher and student (``save_pretrained``) and the batches to ``folder``."""
    import torch
    import transformers

    def config(layers: int) -> Any:
        return transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(args.seq, 128),
            tie_word_embeddings=True,
        )

    torch.manual_seed(args.seed)
    for name, layers in (("teacher", args.layers[0]), ("student", args.layers[1])):
        transformers.LlamaForCausalLM(config(layers)).save_pretrained(folder / name)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(
        0, args.vocab, (args.warmup + args.steps, args.batch, args.seq), generator=g
    )
    torch.save(ids, folder / "batches.pt")


# --------------------------------------------------------------------------- one variant (child)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and ru_maxrss) to the current resident size
        return True
    except OSError:
        return False


def _labels(ids: Any) -> Any:
    """Causal labels aligned with the logits: ``labels[:, t] = ids[:, t + 1]``, last ignored."""
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return labels


def _loss_fn(variant: str, args: argparse.Namespace, teacher: Any, student: Any) -> Any:
    """``step(ids, labels, cached) -> loss`` for one variant (the student in train mode)."""
    import torch

    from kdistill.lm import DEFAULT_CHUNK_ELEMENTS, token_cross_entropy, token_divergence
    from kdistill.lm.fused import fused_linear_divergence, fused_topk_divergence

    kw = {"beta": args.beta}
    head = student.get_output_embeddings()  # tied: the embedding matrix itself, a Parameter

    def dense(ids: Any, labels: Any, cached: Any) -> Any:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits  # (B, T, V)
        s_logits = student(input_ids=ids).logits  # (B, T, V)
        if variant == "plain_old":
            chunk = {"chunk_size": DEFAULT_CHUNK_ELEMENTS // s_logits.shape[-1]}
        else:
            chunk = {"chunk_bytes": args.chunk_bytes}
        return token_divergence(s_logits, t_logits, "jsd", labels=labels, **chunk, **kw)

    def fused(ids: Any, labels: Any, cached: Any) -> Any:
        hidden = student.model(input_ids=ids).last_hidden_state  # (B, T, H), after the norm
        with torch.no_grad():
            if variant == "fused_teacher_hidden":
                t_hidden = teacher.model(input_ids=ids).last_hidden_state  # (B, T, Ht)
                teacher_kw = {
                    "teacher_hidden": t_hidden,
                    "teacher_weight": teacher.get_output_embeddings().weight,
                }
            else:
                teacher_kw = {"teacher_logits": teacher(input_ids=ids).logits}
        return fused_linear_divergence(
            hidden,
            head.weight,
            kind="jsd",
            student_bias=head.bias,
            labels=labels,
            chunk_bytes=args.chunk_bytes,
            **teacher_kw,
            **kw,
        )

    def ce(ids: Any, labels: Any, cached: Any) -> Any:
        return token_cross_entropy(student(input_ids=ids).logits, labels)

    def topk(ids: Any, labels: Any, cached: Any) -> Any:
        values, indices, rest = cached
        if variant == "fused_topk":
            hidden = student.model(input_ids=ids).last_hidden_state
            return fused_topk_divergence(
                hidden, head.weight, head.bias, values, indices, rest, "jsd",
                labels=labels, chunk_bytes=args.chunk_bytes, **kw,
            )  # fmt: skip
        try:
            from kdistill.lm.topk import topk_divergence
        except ImportError:  # before the top-k maths moved out of kdistill.cache
            from kdistill.cache import topk_divergence  # type: ignore[attr-defined,no-redef]
        s_logits = student(input_ids=ids).logits
        return topk_divergence(s_logits, values, indices, rest, "jsd", labels=labels, **kw)

    if variant in ("lm_default", "lm_default_topk"):  # kdistill lm's own model (Trainer path)
        from kdistill.lm.fused_run import FusedTokenKD

        model = FusedTokenKD(
            student,
            teacher if variant == "lm_default" else None,
            kind="jsd",
            beta=args.beta,
            alpha=args.lm_alpha,
        )

        def lm_default(ids: Any, labels: Any, cached: Any) -> Any:
            packed = None
            if cached is not None:
                from kdistill.lm.topk import TOPK as KEY
                from kdistill.lm.topk import pack_topk

                packed = {KEY: pack_topk(*cached)}
            return model({"input_ids": ids}, labels, teacher_outputs=packed)["loss"]

        return lm_default

    table = {"ce": ce, "topk": topk, "fused_topk": topk, "fused": fused}
    table["fused_teacher_hidden"] = fused
    return table.get(variant, dense)


def _topk_cache(teacher: Any, batches: Any, k: int) -> list[tuple[Any, Any, Any]]:
    """The teacher's top-k log-probabilities of every batch, stored as the disk cache does."""
    import torch

    from kdistill.cache import topk_log_probs

    out = []
    with torch.no_grad():
        for ids in batches:
            values, indices, rest = topk_log_probs(teacher(input_ids=ids).logits, k)
            out.append((values.half(), indices.to(torch.int32), rest))
    return out


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch
    import transformers

    torch.set_num_threads(1)
    folder = Path(args.folder)
    load = transformers.LlamaForCausalLM.from_pretrained
    teacher = load(folder / "teacher").eval().requires_grad_(False)
    student = load(folder / "student").train()
    batches = torch.load(folder / "batches.pt")
    cached: list[Any] = [None] * len(batches)
    if variant in TOPK:
        cached = _topk_cache(teacher, batches, args.k)
        del teacher
        teacher = None
    step_loss = _loss_fn(variant, args, teacher, student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=args.adamw_fused)
    gc.collect()
    losses, seconds = [], []
    before_kib = peak_reset = None
    peak_loss_kib = peak_step_kib = 0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for step, ids in enumerate(batches):
        timed = step >= args.warmup
        if step == args.warmup:
            gc.collect()
            before_kib = _status_kib("VmRSS")
            peak_reset = _reset_peak()
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
        labels = _labels(ids)
        start = time.perf_counter()
        loss = step_loss(ids, labels, cached[step])
        loss.backward()
        if timed and peak_reset:  # the forward + backward peak, then the optimizer's own
            peak_loss_kib = max(peak_loss_kib, _status_kib("VmHWM"))
            _reset_peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if timed:
            peak_step_kib = max(peak_step_kib, _status_kib("VmHWM"), peak_loss_kib)
            if peak_reset:  # the next forward + backward is measured without this AdamW step
                _reset_peak()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    timed = seconds[args.warmup :]
    tokens = args.batch * args.seq
    return {
        "variant": variant,
        "losses": losses,
        "step_s": timed,
        "tokens_per_s": [tokens / s for s in timed],
        "peak_mib": peak_step_kib / 1024,
        "peak_fwd_bwd_mib": peak_loss_kib / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": (before_kib or 0) / 1024,
        "peak_reset": bool(peak_reset),
        "minor_faults_per_step": (usage1.ru_minflt - usage0.ru_minflt) / max(len(timed), 1),
        "sys_s_per_step": (usage1.ru_stime - usage0.ru_stime) / max(len(timed), 1),
        "user_s_per_step": (usage1.ru_utime - usage0.ru_utime) / max(len(timed), 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _trl_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over ``vocab`` ids (``GKDTrainer`` needs a ``processing_class``
    for its pad id; the bench feeds token ids, so no text is ever tokenised)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    tok = Tokenizer(words)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t0")


def run_trl_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GKD trainer's own training loop (``trainer.train()``) on the same models/batches.

    ``GKDTrainer`` (``trl.experimental.gkd`` in TRL 1.x) with ``lmbda = 0`` (no on-policy
    generation), ``seq_kd`` off, the bench's ``beta``, temperature 1, float32 (``bf16`` off),
    no gradient clipping, a constant learning rate and the bench's own ``torch.optim.AdamW``
    (passed through ``optimizers=``, so that both runs apply the very same update), batches in
    the bench's order (``train_sampling_strategy: sequential``). ``trl_gc`` keeps TRL's SFT default
    ``gradient_checkpointing: true``; ``trl`` turns it off (the like-for-like computation).
    Labels are the input ids with position 0 ignored: TRL shifts them (``labels[:, 1:]``), so it
    counts the same ``T − 1`` next-token positions per row as the other variants.

    Step time runs from one ``on_step_end`` to the next (the whole Trainer loop: batch fetch,
    forward, backward, optimizer, callbacks); peaks are read in ``on_pre_optimizer_step``
    (forward + backward) and ``on_step_end``; the losses are what ``training_step`` returns.
    """
    import gc

    import datasets
    import torch
    import transformers

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # TRL < 1.0 exported it at the top level
        from trl import GKDConfig, GKDTrainer  # type: ignore[no-redef]
    import trl

    torch.set_num_threads(1)
    folder = Path(args.folder)
    load = transformers.LlamaForCausalLM.from_pretrained
    teacher = load(folder / "teacher").eval().requires_grad_(False)
    student = load(folder / "student").train()
    batches = torch.load(folder / "batches.pt")

    rows = batches.flatten(0, 1)  # (steps * B, T), read in order (sequential sampling)
    labels = rows.clone()
    labels[:, 0] = -100
    examples = datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels}
    ).with_format("torch")

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    losses: list[float] = []
    ends: list[float] = []
    memory: dict[str, Any] = {"before": None, "reset": None, "fwd_bwd": 0, "step": 0}

    class Measure(transformers.TrainerCallback):
        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == args.warmup:
                gc.collect()
                memory["before"] = _status_kib("VmRSS")
                memory["reset"] = _reset_peak()
                memory["usage0"] = resource.getrusage(resource.RUSAGE_SELF)

        def on_pre_optimizer_step(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step >= args.warmup and memory["reset"]:
                memory["fwd_bwd"] = max(memory["fwd_bwd"], _status_kib("VmHWM"))
                _reset_peak()

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())
            if state.global_step > args.warmup:  # global_step counts the finished step already
                memory["step"] = max(memory["step"], _status_kib("VmHWM"), memory["fwd_bwd"])
                if memory["reset"]:  # the next forward + backward without this AdamW step
                    _reset_peak()

    class Recording(GKDTrainer):  # TRL's own step; only its returned loss is recorded
        def training_step(self, *a: Any, **kw: Any) -> Any:
            loss = super().training_step(*a, **kw)
            losses.append(loss.item())
            return loss

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=args.adamw_fused)
    with tempfile.TemporaryDirectory(prefix="trl_out_") as out:
        config = GKDConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            lmbda=0.0,
            seq_kd=False,
            beta=args.beta,
            temperature=1.0,
            bf16=False,
            fp16=False,
            gradient_checkpointing=variant == "trl_gc",
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=args.seed,
            train_sampling_strategy="sequential",
        )
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=examples,
            data_collator=collate,
            processing_class=_trl_tokenizer(args.vocab),
            optimizers=(optimizer, None),
            callbacks=[Measure()],
        )
        start = time.perf_counter()
        trainer.train()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    usage0 = memory.get("usage0", usage1)
    seconds = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    timed = seconds[args.warmup :]
    tokens = args.batch * args.seq
    return {
        "variant": variant,
        "losses": losses,
        "step_s": timed,
        "tokens_per_s": [tokens / s for s in timed],
        "peak_mib": memory["step"] / 1024,
        "peak_fwd_bwd_mib": memory["fwd_bwd"] / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": (memory["before"] or 0) / 1024,
        "peak_reset": bool(memory["reset"]),
        "minor_faults_per_step": (usage1.ru_minflt - usage0.ru_minflt) / max(len(timed), 1),
        "sys_s_per_step": (usage1.ru_stime - usage0.ru_stime) / max(len(timed), 1),
        "user_s_per_step": (usage1.ru_utime - usage0.ru_utime) / max(len(timed), 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "gradient_checkpointing": variant == "trl_gc",
    }


def run_interleaved(variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Step times of several variants in ONE process, alternating step by step.

    Each variant trains its own copy of the student on the same batches; round ``r`` runs one
    step of every variant, in reversed order on odd rounds, so that a load change on a shared
    machine hits all of them alike (the separate-process runs are sequential and pick up
    drift). Time only (the processes share one heap, so no peak memory here).
    """
    import torch
    import transformers

    torch.set_num_threads(1)
    folder = Path(args.folder)
    load = transformers.LlamaForCausalLM.from_pretrained
    teacher = load(folder / "teacher").eval().requires_grad_(False)
    batches = torch.load(folder / "batches.pt")
    cached: list[Any] = [None] * len(batches)
    if any(v in TOPK for v in variants):
        cached = _topk_cache(teacher, batches, args.k)
    if all(v in (*TOPK, "ce") for v in variants):
        teacher = None
    runs = {}
    for v in variants:
        student = load(folder / "student").train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=args.adamw_fused)
        runs[v] = (_loss_fn(v, args, None if v in TOPK else teacher, student), optimizer, [])
    for step, ids in enumerate(batches):
        order = variants if step % 2 == 0 else variants[::-1]
        for v in order:
            step_loss, optimizer, seconds = runs[v]
            labels = _labels(ids)
            start = time.perf_counter()
            loss = step_loss(ids, labels, cached[step] if v in TOPK else None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
    return {v: runs[v][2][args.warmup :] for v in variants}


# --------------------------------------------------------------------------- driver


def _child_argv(args: argparse.Namespace, variant: str, python: str) -> list[str]:
    keep = ("vocab", "hidden", "intermediate", "heads", "kv_heads", "batch", "seq", "steps")
    keep += ("warmup", "seed", "beta", "lr", "chunk_bytes", "k", "lm_alpha", "folder")
    argv = [python, __file__, "--child", variant]
    for name in keep:
        argv.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    if args.adamw_fused:
        argv.append("--adamw-fused")
    argv += ["--layers", *map(str, args.layers)]
    return argv


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    ce = results.get("ce")
    rows = [
        "| variant | tokens/s (mean ± std) | time vs CE | peak RSS fwd+bwd (above pre-step)"
        " | peak RSS incl. AdamW step | minor faults / step | sys s / step | max \\|Δ loss\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        tps = r["tokens_per_s"]
        mean = statistics.fmean(tps)
        std = statistics.stdev(tps) if len(tps) > 1 else 0.0
        vs_ce = f"{statistics.fmean(ce['tokens_per_s']) / mean:.2f}×" if ce else "—"
        base = "topk" if name in TOPK else "lm_default" if name in TRL else "budget"
        diff = "—"
        if name != "ce" and base in results and name != base:
            pairs = zip(r["losses"], results[base]["losses"], strict=True)
            diff = f"{max(abs(a - b) for a, b in pairs):.1e}"
        fwd_bwd = r["peak_fwd_bwd_mib"]
        rows.append(
            f"| {name} | {mean:.1f} ± {std:.1f} | {vs_ce} | {fwd_bwd:.0f} MiB "
            f"({fwd_bwd - r['rss_before_mib']:.0f} MiB) | {r['peak_mib']:.0f} MiB | "
            f"{r['minor_faults_per_step']:.0f} | {r['sys_s_per_step']:.3f} | {diff} |"
        )
    return "\n".join(rows)


def _ratios(results: dict[str, dict[str, Any]]) -> list[str]:
    """``lm_default`` against each TRL arm: tokens/s ratio, peak ratios, largest loss gap."""
    ours = results.get("lm_default")
    lines = []
    for name in TRL:
        theirs = results.get(name)
        if ours is None or theirs is None:
            continue
        speed = statistics.fmean(ours["tokens_per_s"]) / statistics.fmean(theirs["tokens_per_s"])
        peak = ours["peak_mib"] / theirs["peak_mib"]
        above = (ours["peak_mib"] - ours["rss_before_mib"]) / (
            theirs["peak_mib"] - theirs["rss_before_mib"]
        )
        pairs = zip(ours["losses"], theirs["losses"], strict=True)
        gap = max(abs(a - b) for a, b in pairs)
        lines.append(
            f"lm_default vs {name}: tokens/s {speed:.2f}× (goal ≥ 1.5×); peak RSS {peak:.2f}× "
            f"(goal ≤ 0.5×); peak above the pre-step resident size {above:.2f}×; "
            f"max |Δ loss| {gap:.1e} over {len(ours['losses'])} steps (goal 1e-6)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument(
        "--layers", type=int, nargs=2, default=[4, 2], metavar=("TEACHER", "STUDENT")
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta (GKD)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--adamw-fused", action="store_true",
        help="every variant's AdamW with fused=True (TRL's default optimizer, adamw_torch_fused; "
        "no per-parameter temporaries in the step; kdistill lm's default since b785077, "
        "optim.fused); default: torch's for-loop AdamW (optim.fused: false)",
    )  # fmt: skip
    parser.add_argument("--chunk-bytes", type=int, default=32 << 20)
    parser.add_argument("--k", type=int, default=32, help="top-k of the cached-teacher variants")
    parser.add_argument(
        "--lm-alpha", type=float, default=1.0, help="alpha of the lm_default variants (KD weight)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--trl-python", help="OPTIONAL: a Python with trl installed; adds the 'trl' variant"
    )
    parser.add_argument(
        "--trl-variants", nargs="+", default=list(TRL), choices=TRL,
        help="the TRL arms run with --trl-python (trl: no gradient checkpointing; trl_gc: "
        "TRL's SFT default gradient_checkpointing: true)",
    )  # fmt: skip
    parser.add_argument(
        "--malloc-tune",
        action="store_true",
        help="run the children with GLIBC_TUNABLES that keep freed memory in the heap (no "
        "mmap for large tensors, no trimming): removes the page faults of re-allocating "
        "~100 MB tensors every step, at the cost of holding the high-water mark",
    )
    parser.add_argument(
        "--interleave", nargs="+", choices=VARIANTS, metavar="VARIANT",
        help="instead: time these variants in one process, step by step in turn (ratios to "
        "the first; e.g. --interleave ce lm_default_topk)",
    )  # fmt: skip
    parser.add_argument("--json", help="write all results (per-step losses, times) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = run_trl_child if args.child in TRL else run_child
        print(json.dumps(child(args.child, args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if args.malloc_tune:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    if args.interleave:
        with tempfile.TemporaryDirectory(prefix="lm_step_") as folder:
            args.folder = folder
            build_models(args, Path(folder))
            times = run_interleaved(args.interleave, args)
        base = args.interleave[0]
        print(
            f"interleaved in one process, {args.steps} timed steps after {args.warmup}, load "
            f"average {os.getloadavg()[0]:.1f}; time per step (mean ± std) and ratio to {base}:"
        )
        for v, sec in times.items():
            std = statistics.stdev(sec) if len(sec) > 1 else 0.0
            ratio = sum(sec) / sum(times[base])
            print(f"  {v}: {statistics.fmean(sec):.3f} ± {std:.3f} s, {ratio:.3f}× {base}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "interleaved": times}))
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lm_step_") as folder:
        args.folder = folder
        build_models(args, Path(folder))
        plan = [(v, sys.executable) for v in args.variants]
        if args.trl_python:  # ---- OPTIONAL TRL arm: its own interpreter / venv
            plan += [(v, args.trl_python) for v in args.trl_variants]
        for variant, python in plan:
            out = subprocess.run(
                _child_argv(args, variant, python), env=env, capture_output=True, text=True
            )
            if out.returncode:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant}: done", file=sys.stderr)
    first = next(iter(results.values()))
    print(
        f"commit {_commit()}, {platform.machine()} {os.cpu_count()} CPUs (1 thread per variant), "
        f"load average {os.getloadavg()[0]:.1f}; torch {first['torch']}, transformers "
        f"{first['transformers']}; Llama teacher {args.layers[0]} / student {args.layers[1]} "
        f"layers, hidden {args.hidden}, vocab {args.vocab}, tied embeddings; batch "
        f"{args.batch} x {args.seq}; JSD beta {args.beta}; AdamW lr {args.lr} "
        f"{'fused' if args.adamw_fused else 'for-loop'}; {args.steps} "
        f"timed steps after {args.warmup}; chunk_bytes {args.chunk_bytes}; top-k k = {args.k}; "
        f"seed {args.seed}; GLIBC_TUNABLES {env.get('GLIBC_TUNABLES', 'unset')}\n"
    )
    print(_table(results, args))
    for line in _ratios(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
