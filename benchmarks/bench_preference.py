"""Preference steps, lorakit against TRL: a DPO step and a reward-model step, time and memory.

Usage: PYTHONPATH=python python benchmarks/bench_preference.py [--device cpu|cuda]
    [--hidden 256] [--layers 2] [--vocab 32000] [--pairs 4] [--prompt-len 128]
    [--completion-len 128] [--warmup 2] [--steps 5] [--methods lora qlora]
    [--objectives dpo reward] [--gradient-checkpointing] [--threads N]

One randomly initialised Llama (built from a config, nothing downloaded; a word-level tokenizer
whose vocabulary is ``--vocab`` tokens) is saved once; then every configuration (step x method x
library) trains it in a fresh process (``preference_worker.py``, whose docstring says what is
matched between the libraries and what is measured): lorakit's DPO objective (reference = the
adapters disabled) and reward objective against TRL 1.16's ``DPOTrainer`` (PEFT model,
``ref_model=None``) and ``RewardTrainer`` + PEFT; QLoRA against PEFT + bitsandbytes 4-bit.
Prints the machine, the versions, each configuration's median and p90 step time, median CPU
time per step and memory peak, and the ratios lorakit / TRL against the targets (DPO: memory
<= 0.5x, time <= 0.8x). A configuration that cannot run prints its error in its row.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.models import tiny_llama, word_tokenizer
from measure import cpu_paths

WORKER = Path(__file__).with_name("preference_worker.py")
LIBRARIES = ("lorakit", "trl")
STEPS = ("dpo", "reward")
METHODS = ("lora", "qlora")
MEMORY_TARGET, TIME_TARGET = 0.5, 0.8  # DPO, lorakit / TRL (issue 10)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return out.stdout.strip() or "unknown"


def save_model(args: argparse.Namespace, directory: Path) -> int:
    """Saves the tokenizer and the random Llama to ``directory``; returns its parameter count."""
    words = " ".join(f"w{i}" for i in range(args.vocab - 4))  # 4 special tokens
    tokenizer = word_tokenizer([words])
    model = tiny_llama(
        tokenizer,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.hidden // 64,
        max_positions=args.prompt_len + args.completion_len,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run_worker(spec: dict[str, Any], worker: Path = WORKER) -> dict[str, Any]:
    """One configuration in its own process (``worker SPEC.json RESULT.json``); its result, or
    ``{"error": last line}``."""
    spec_path, result_path = Path(f"{spec['out']}.json"), Path(f"{spec['out']}.result.json")
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(worker), str(spec_path), str(result_path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return {"error": lines[-1]}
    return json.loads(result_path.read_text())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def report_rows(step: str, method: str, results: dict[str, dict[str, Any]]) -> list[str]:
    """Table rows of one step and method: each library, then the ratio lorakit / TRL."""
    rows = []
    for library in LIBRARIES:
        r = results[library]
        if "error" in r:
            rows.append(f"| {step} | {method} | {library} | failed: {r['error']} | | | | |")
            continue
        rows.append(
            f"| {step} | {method} | {library} | {r['median_ms']:.0f} | {r['p90_ms']:.0f} "
            f"| {r['cpu_ms']:.0f} | {r['peak_mib']:.0f} | {r['trainable']:,} |"
        )
    ours, theirs = results["lorakit"], results["trl"]
    if "error" not in ours and "error" not in theirs:
        rows.append(
            f"| {step} | {method} | **lorakit / TRL** "
            f"| **{_ratio(ours['median_ms'], theirs['median_ms'])}** "
            f"| {_ratio(ours['p90_ms'], theirs['p90_ms'])} "
            f"| {_ratio(ours['cpu_ms'], theirs['cpu_ms'])} "
            f"| **{_ratio(ours['peak_mib'], theirs['peak_mib'])}** | |"
        )
    return rows


def verdict(results: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """The DPO targets, one line per method that both libraries ran."""
    lines = []
    for (step, method, library), ours in results.items():
        theirs = results.get((step, method, "trl"), {})
        if step != "dpo" or library != "lorakit" or "error" in ours or "error" in theirs:
            continue
        memory = ours["peak_mib"] / theirs["peak_mib"]
        time = ours["median_ms"] / theirs["median_ms"]
        cpu = ours["cpu_ms"] / theirs["cpu_ms"]
        lines.append(
            f"DPO {method}: memory {memory:.2f}x TRL's (target <= {MEMORY_TARGET}x: "
            f"{'met' if memory <= MEMORY_TARGET else 'MISSED'}), median step time {time:.2f}x, "
            f"CPU time {cpu:.2f}x (target <= {TIME_TARGET}x: "
            f"{'met' if max(time, cpu) <= TIME_TARGET else 'MISSED'})"
        )
    return lines


def header(args: argparse.Namespace, parameters: int, threads: int, load: float) -> str:
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {_cpu_model()} ({os.cpu_count()} cores), {cpu_paths()}"
    info = lorakit.build_info()
    kernels = "CUDA kernels compiled" if info.cuda_compiled else "no CUDA kernels"
    tokens = args.prompt_len + args.completion_len
    return "\n".join(
        [
            f"## Preference steps, lorakit vs TRL: {where}, {threads} torch thread(s)",
            "",
            f"torch {torch.__version__}, transformers {_version('transformers')}, "
            f"trl {_version('trl')}, peft {_version('peft')}, "
            f"bitsandbytes {_version('bitsandbytes')}; lorakit {info.version} (built against "
            f"torch {info.torch_version}, {kernels}), "
            f"commit {_commit()}; load average at start {load:.2f}",
            "",
            f"Model: Llama, hidden {args.hidden}, {args.layers} layers, {args.hidden // 64} heads, "
            f"vocabulary {args.vocab:,}, {parameters / 1e6:.1f}M parameters, float32 weights"
            f"{' (bf16 autocast)' if args.device == 'cuda' else ''}. Batch: {args.pairs} pairs "
            f"({2 * args.pairs} sequences of {tokens} tokens: prompt {args.prompt_len}, "
            f"completion {args.completion_len}). LoRA r 16, alpha 32, every linear layer but "
            f"the head; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} "
            f"in both. {args.warmup} warm-up steps, then {args.steps} timed steps; one process "
            f"per row.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--objectives", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in both libraries")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_preference_") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        parameters = save_model(args, model_dir)
        print(header(args, parameters, args.threads, load), flush=True)
        print(
            "\n| step | method | library | median step (ms) | p90 step (ms) "
            "| median CPU time / step (ms) | peak memory growth (MiB) | trainable params |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|", flush=True)
        spec = {
            "model_dir": str(model_dir), "device": args.device, "pairs": args.pairs,
            "prompt_len": args.prompt_len, "completion_len": args.completion_len,
            "warmup": args.warmup, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing,
        }  # fmt: skip
        results: dict[tuple[str, str, str], dict[str, Any]] = {}
        optimizers: dict[str, str] = {}
        for step in args.objectives:
            for method in args.methods:
                for library in LIBRARIES:
                    name = f"{step}_{method}_{library}"
                    run = {**spec, "step": step, "method": method, "library": library}
                    run["out"] = str(work / name)
                    results[step, method, library] = result = run_worker(run)
                    if "optimizer" in result:
                        optimizers[library] = result["optimizer"]
                mine = {lib: results[step, method, lib] for lib in LIBRARIES}
                print("\n".join(report_rows(step, method, mine)), flush=True)
    print(f"\nOptimizers: {'; '.join(f'{k}: {v}' for k, v in optimizers.items())}.")
    print(f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    for line in verdict(results):
        print(f"- {line}")


if __name__ == "__main__":
    main()
