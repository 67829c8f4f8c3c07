"""Throughput of ``kdistill generate`` against ``kdistill serve`` (issue 14, "Science and speed").

One run starts ``kdistill serve`` (SmolLM2-135M-Instruct, the float conversion that
:func:`kdistill.lm.pretrained.load_smollm2` caches) on 127.0.0.1 at a free port and measures,
on the same ``--prompts`` WordNet instructions, greedy, ``--max-tokens`` new tokens each:

* **(a) server, batched** — the server handed full batches directly: one
  ``/v1/completions`` request per ``--concurrency`` prompts (``prompt`` a list), which the
  server runs as one padded ``generate`` (``/kdistill/stats`` confirms the batch sizes). No
  client concurrency is involved: this is the server's own batched throughput.
* **(b) generate, concurrency N** — ``kdistill generate`` (the CLI, a subprocess) with
  ``teacher.concurrency: N``: one request per prompt, the server's batcher groups them.
* **(c) generate, one at a time** — the same with ``concurrency: 1``.

Throughput = completion tokens (the server's ``usage``) / wall seconds; for (b) and (c) the
figure ``kdistill generate`` prints (timed inside ``run_generate``, interpreter start-up
excluded). The three are interleaved for ``--rounds`` rounds (the machine is shared; the
median per mode is reported) and the ratios (b)/(c) and (b)/(a) are taken within a round.

Run (≈ 5 min on 2 busy cores)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/serve_throughput.py \\
        --out bench/results/served_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet/data.noun")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wordnet_words(path: Path, count: int) -> list[str]:
    """The first ``count`` distinct one-word nouns of WordNet, every 50th synset."""
    words: list[str] = []
    with open(path, encoding="latin-1") as handle:
        for i, line in enumerate(handle):
            if line.startswith("  ") or i % 50:
                continue
            word = line.split()[4]
            if word.isalpha() and word.islower() and word not in words:
                words.append(word)
            if len(words) == count:
                break
    return words


def teacher_dir() -> Path:
    from kdistill.lm.pretrained import load_smollm2, smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "config.json").is_file():
        log("converting SmolLM2-135M-Instruct from its GGUF once (load_smollm2)")
        load_smollm2()
    return folder


def start_server(model_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "kdistill", "serve", str(model_dir), "--port", str(port),
        "--name", "smollm2", "--device", "cpu", "--dtype", "float32",
        "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
        "--batch-patience", str(getattr(args, "batch_patience", 0.1)),
    ]  # fmt: skip
    log(" ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kdistill serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("kdistill serve did not answer within 300 s")


def stats(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/kdistill/stats", timeout=10).json()


def batch_sizes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Batches run between two stats calls and their sizes (sequences per batch)."""
    new = after["batches"] - before["batches"]
    sizes = after.get("history", [])[-new:] if new else []
    return {"batches": new, "sizes": sizes}


def server_batched(port: int, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """(a): one /v1/completions request per full batch of prompts."""
    before = stats(port)
    tokens, start = 0, time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for i in range(0, len(prompts), args.concurrency):
            body = {"model": "smollm2", "prompt": prompts[i : i + args.concurrency],
                    "max_tokens": args.max_tokens, "temperature": 0, "logprobs": args.logprobs}  # fmt: skip
            response = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            **batch_sizes(before, stats(port))}  # fmt: skip


_LINE = re.compile(r"in ([\d.]+) s \((\d+) requests.*?(\d+) tokens out, ([\d.]+) tokens/s\)")


def run_generate_cli(
    port: int, prompts_file: Path, workdir: Path, concurrency: int, tag: str,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """(b) / (c): ``kdistill generate`` with ``teacher.concurrency`` = ``concurrency``."""
    import yaml

    output = workdir / f"{tag}.jsonl"
    config = {
        "teacher": {"endpoint": f"http://127.0.0.1:{port}/v1", "model": "smollm2",
                    "api": "completions", "concurrency": concurrency, "timeout": 600},
        "prompts": {"file": str(prompts_file)},
        "sampling": {"temperature": 0, "max_tokens": args.max_tokens, "logprobs": args.logprobs},
        "output": str(output),
        "progress": "off",
    }  # fmt: skip
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    before = stats(port)
    done = subprocess.run(
        [sys.executable, "-m", "kdistill", "generate", str(path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = _LINE.search(done.stdout)
    if match is None:
        raise RuntimeError(f"unexpected kdistill generate output: {done.stdout}{done.stderr}")
    seconds, requests, tokens, rate = match.groups()
    return {"tokens": int(tokens), "seconds": float(seconds), "requests": int(requests),
            "tokens_per_s": float(rate), "stdout": done.stdout.strip(),
            **batch_sizes(before, stats(port))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--batch-patience", type=float, default=0.1)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-single", action="store_true", help="omit (c) after round 1")
    parser.add_argument("--out", default="bench/results/served_throughput.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = wordnet_words(WORDNET, args.prompts)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Define the word '{w}' in one sentence."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for w in words
    ]
    port = free_port()
    server = start_server(model_dir, port, args)
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            prompts_file = workdir / "prompts.jsonl"
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            server_batched(port, prompts[: args.concurrency], args)  # warm-up
            for r in range(args.rounds):
                row: dict[str, Any] = {}
                row["a_server_batched"] = server_batched(port, prompts, args)
                log(f"round {r}: (a) {row['a_server_batched']['tokens_per_s']:.1f} tokens/s")
                row["b_generate_concurrent"] = run_generate_cli(
                    port, prompts_file, workdir, args.concurrency, f"b{r}", args
                )
                log(f"round {r}: (b) {row['b_generate_concurrent']['tokens_per_s']:.1f} tokens/s")
                if r == 0 or not args.skip_single:
                    row["c_generate_single"] = run_generate_cli(
                        port, prompts_file, workdir, 1, f"c{r}", args
                    )
                    log(f"round {r}: (c) {row['c_generate_single']['tokens_per_s']:.1f} tokens/s")
                a, b = row["a_server_batched"], row["b_generate_concurrent"]
                row["b_over_a"] = b["tokens_per_s"] / a["tokens_per_s"]
                if "c_generate_single" in row:
                    row["b_over_c"] = b["tokens_per_s"] / row["c_generate_single"]["tokens_per_s"]
                log(f"round {r}: (b)/(a) = {row['b_over_a']:.3f}"
                    + (f", (b)/(c) = {row['b_over_c']:.2f}" if "b_over_c" in row else ""))  # fmt: skip
                rounds.append(row)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def median(key: str, sub: str | None = None) -> float:
        values = [r[key][sub] if sub else r[key] for r in rounds if key in r]
        return statistics.median(values)

    summary = {
        "a_tokens_per_s": median("a_server_batched", "tokens_per_s"),
        "b_tokens_per_s": median("b_generate_concurrent", "tokens_per_s"),
        "c_tokens_per_s": median("c_generate_single", "tokens_per_s"),
        "b_over_a": median("b_over_a"),
        "b_over_c": median("b_over_c"),
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    result = {
        "bench": "serve_throughput",
        "command": " ".join(sys.argv),
        "commit": commit,
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "teacher": "SmolLM2-135M-Instruct (float32, kdistill serve --device cpu)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rounds,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log(json.dumps(summary))


if __name__ == "__main__":
    main()
