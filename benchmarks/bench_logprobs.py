"""Completion log-probs: peak memory and time of the chunked paths against the plain one.

Usage: PYTHONPATH=python python benchmarks/bench_logprobs.py [--device cpu|cuda] [--vocab 32000]
    [--hidden 1024] [--rows 8] [--seq 512] [--chunk-tokens 512] [--train-head]

A DPO-shaped batch: ``--rows`` sequences (chosen and rejected) of ``--seq`` tokens whose second
half is the scored completion. Forward and backward of the summed log-probs, three ways:

- plain: the head's logits for every position, float32 ``log_softmax``, gather (what a model's
  forward followed by a log-softmax does);
- from logits: the model's logits as input, :func:`sequence_logprobs_from_logits`;
- chunked: from the final hidden states, :func:`sequence_logprobs` under activation
  checkpointing (``fused=False``);
- fused: the same through lorakit's fused op (its default).

Each runs in a fresh process, so that its peak is its own: on the CPU the growth of peak RSS
(``ru_maxrss``) over the RSS after the inputs exist; on a GPU ``max_memory_allocated`` over the
memory allocated then. The head is frozen (as in LoRA) unless ``--train-head``. Time: the median
of ``--repeats`` forward + backward passes after the measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from lorakit.data.encode import IGNORE
from lorakit.losses import sequence_logprobs, sequence_logprobs_from_logits
from measure import peak_and_times

VARIANTS = ("plain", "from_logits", "chunked", "fused")


def _plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)[:, :-1]
    targets = labels[:, 1:]
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(dim=1)


def _child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = args.device
    hidden = torch.randn(args.rows, args.seq, args.hidden, device=device, requires_grad=True)
    weight = torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5
    weight.requires_grad_(args.train_head)
    labels = torch.randint(0, args.vocab, (args.rows, args.seq), device=device)
    labels[:, : args.seq // 2] = IGNORE

    def step() -> None:
        if args.variant == "plain":
            logprobs = _plain(hidden, weight, labels)
        elif args.variant == "from_logits":
            logits = F.linear(hidden, weight)
            logprobs = sequence_logprobs_from_logits(logits, labels, args.chunk_tokens)
        else:
            fused = args.variant == "fused"
            logprobs = sequence_logprobs(
                hidden, weight, labels, chunk_tokens=args.chunk_tokens, fused=fused
            )
        logprobs.sum().backward()
        hidden.grad = weight.grad = None

    peak, times = peak_and_times(step, device, args.repeats)
    print(json.dumps({"peak": peak, "ms": statistics.median(times) * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=8, help="sequences (2 per pair)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--train-head", action="store_true", help="the head's weight trains too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args)
        return

    scored = args.rows * (args.seq - args.seq // 2 - 1)
    print(
        f"rows {args.rows} x {args.seq} tokens ({scored} scored), hidden {args.hidden}, "
        f"vocab {args.vocab}, chunk {args.chunk_tokens} tokens, float32, "
        f"head {'trained' if args.train_head else 'frozen'}, device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    all_logits = args.rows * args.seq * args.vocab * 4
    print(f"float32 logits of the whole batch: {all_logits / 2**20:.0f} MiB\n")
    print("| path | peak memory growth (MiB) | vs plain | fwd+bwd (ms) | vs plain |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, *sys.argv, "--variant", variant]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        plain = results["plain"]
        r = results[variant]
        print(
            f"| {variant} | {r['peak'] / 2**20:.0f} | {r['peak'] / plain['peak']:.3f}x "
            f"| {r['ms']:.0f} | {r['ms'] / plain['ms']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
