"""Fused linear cross-entropy against F.linear + F.cross_entropy: peak memory and time.

Usage: PYTHONPATH=python python benchmarks/bench_fused_ce.py [--device cpu|cuda]
    [--hidden H] [--vocab V] [--tokens T] [--dtype float32|bfloat16] [--train-head]
    [--chunk-tokens 0] [--repeats 5]

The summed cross-entropy of T tokens (every tenth ignored) from hidden states (T, H) and an LM
head (V, H), forward and backward, two ways:

- unfused: ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")``, what a
  model's logits followed by its loss do;
- fused: :func:`lorakit.ops.fused_linear_cross_entropy`, one chunk of tokens' logits at a time
  (``--chunk-tokens``, 0: the op's choice by memory).

Defaults: on a GPU the Llama-3-8B shape (hidden 4096, vocabulary 128,256, 8192 tokens, bfloat16);
on the CPU hidden 1024, vocabulary 32,000, 2048 tokens, float32. Each variant runs in a fresh
process (benchmarks/measure.py: peak RSS growth on the CPU, max_memory_allocated on a GPU). The
head is frozen (as in LoRA) unless ``--train-head``. Time: median and 90th percentile of
``--repeats`` forward + backward passes after the first (measured for memory, and warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from lorakit import ops
from measure import cpu_paths, peak_and_times

VARIANTS = ("unfused", "fused")
PRESETS = {
    "cuda": {"hidden": 4096, "vocab": 128256, "tokens": 8192, "dtype": "bfloat16"},
    "cpu": {"hidden": 1024, "vocab": 32000, "tokens": 2048, "dtype": "float32"},
}


def _child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device, dtype = args.device, getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    hidden.requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5).to(dtype)
    weight.requires_grad_(args.train_head)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    labels[::10] = -100

    def step() -> None:
        if args.variant == "unfused":
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            loss = ops.fused_linear_cross_entropy(hidden, weight, labels, args.chunk_tokens)
        loss.backward()
        hidden.grad = weight.grad = None

    peak, times = peak_and_times(step, device, args.repeats)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    print(json.dumps({"peak": peak, "median": statistics.median(times) * 1e3, "p90": p90 * 1e3}))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--train-head", action="store_true", help="the head's weight trains too")
    parser.add_argument("--chunk-tokens", type=int, default=0, help="0: the op's choice")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, value in PRESETS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = _parse()
    if args.variant:
        _child(args)
        return
    print(
        f"{args.tokens} tokens (every tenth ignored), hidden {args.hidden}, vocab {args.vocab}, "
        f"{args.dtype}, head {'trained' if args.train_head else 'frozen'}, device {args.device}, "
        f"chunk {args.chunk_tokens or 'auto'}, {torch.get_num_threads()} threads, "
        f"{cpu_paths()}, "
        f"median / p90 of {args.repeats}"
    )
    logits = args.tokens * args.vocab * 4
    print(f"float32 logits of all tokens: {logits / 2**20:.0f} MiB\n")
    print("| path | peak memory (MiB) | vs unfused | median (ms) | p90 (ms) | vs unfused |")
    print("|---|---:|---:|---:|---:|---:|")
    fixed = ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--tokens", str(args.tokens)]
    fixed += ["--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
    fixed += ["--chunk-tokens", str(args.chunk_tokens)] + ["--train-head"] * args.train_head
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, sys.argv[0], *fixed, "--variant", variant]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = r = json.loads(out.strip().splitlines()[-1])
        base = results["unfused"]
        print(
            f"| {variant} | {r['peak'] / 2**20:.0f} | {r['peak'] / base['peak']:.3f}x "
            f"| {r['median']:.0f} | {r['p90']:.0f} | {r['median'] / base['median']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
