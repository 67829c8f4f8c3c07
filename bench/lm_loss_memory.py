"""Peak memory and time of the LM token losses: plain vs chunked vs fused, side by side.

    python bench/lm_loss_memory.py                    # N = 1024 tokens, V = 32,768, H = 512, JSD
    python bench/lm_loss_memory.py --tokens 4096 --vocab 49152 --hidden 576   # issue 6's shape

Each variant runs forward + backward in its own subprocess (one thread), so its peak resident
memory (VmHWM) above the inputs is its own. Prints a Markdown table with ratios to the plain
computation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = ("plain", "chunked", "plain_head", "fused")


def child(variant: str, n: int, v: int, h: int, kind: str, chunk: int) -> dict[str, float]:
    import torch

    from kdistill.lm import fused_linear_divergence, token_divergence, token_divergence_reference

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, v, generator=g)
    if variant in ("plain", "chunked"):
        s = torch.randn(n, v, generator=g).requires_grad_()
    else:
        hidden = torch.randn(n, h, generator=g).requires_grad_()
        weight = (torch.randn(v, h, generator=g) * 0.05).requires_grad_()
    before = _rss("VmRSS")
    start = time.perf_counter()
    if variant == "plain":
        token_divergence_reference(s, t, kind).backward()
    elif variant == "chunked":
        token_divergence(s, t, kind, chunk_size=chunk).backward()
    elif variant == "plain_head":
        token_divergence_reference(hidden @ weight.T, t, kind).backward()
    else:
        fused_linear_divergence(hidden, weight, t, kind, chunk_size=chunk).backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": _rss("VmHWM") - before, "seconds": seconds}


def _rss(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--kind", default="jsd")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                child(args.child, args.tokens, args.vocab, args.hidden, args.kind, args.chunk)
            )
        )
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                *(
                    f"--{k}={v}"
                    for k, v in (
                        ("tokens", args.tokens),
                        ("vocab", args.vocab),
                        ("hidden", args.hidden),
                        ("kind", args.kind),
                        ("chunk", args.chunk),
                    )
                ),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    nv = args.tokens * args.vocab * 4 / 2**20
    print(
        f"N = {args.tokens} tokens, V = {args.vocab}, H = {args.hidden}, {args.kind}, chunk "
        f"{args.chunk}, float32, 1 thread; one (N, V) float32 tensor = {nv:.0f} MiB\n"
    )
    print("| variant | peak above inputs | vs plain | forward + backward | vs plain |")
    print("|---|---:|---:|---:|---:|")
    for variant, base in (
        ("plain", "plain"),
        ("chunked", "plain"),
        ("plain_head", "plain_head"),
        ("fused", "plain_head"),
    ):
        r, b = results[variant], results[base]
        print(
            f"| {variant} | {r['peak_mib']:.0f} MiB | {r['peak_mib'] / b['peak_mib']:.2f}× "
            f"| {r['seconds']:.2f} s | {r['seconds'] / b['seconds']:.2f}× |"
        )


if __name__ == "__main__":
    main()
