"""RL memory and rollout speed: a PPO step against an SFT step, one base against four models,
and generation through lorakit's QLoRA layers against PEFT + bitsandbytes 4-bit.

Usage: PYTHONPATH=python python benchmarks/bench_rl.py [--device cpu|cuda] [--method qlora]
    [--hidden 512] [--layers 4] [--vocab 32000] [--batch 8] [--prompt-len 64]
    [--completion-len 64] [--warmup 1] [--steps 3] [--gen-steps 5] [--gen-tokens 32]
    [--threads N]

One randomly initialised Llama (``bench_preference.save_model``: nothing downloaded) and a reward
adapter for it as ``lorakit reward`` writes it are saved once; each variant then runs in a
fresh process (``rl_worker.py``, whose docstring says what each measures): an SFT step, a PPO
step with every role on the one base, the same PPO step with the four-model layout's copies
held, and ``generate`` with each library. Prints the machine, the versions, each variant's
median and p90 step time, CPU time, memory peak (weights included) and, for PPO, the bytes of
the distinct tensors its roles hold; the ratios PPO / SFT (target <= 1.3x: issue 11) and four
models / one base, and the generation speed ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import lorakit
from bench_preference import _commit, _cpu_model, _version, run_worker, save_model
from lorakit.models import ModelConfig
from lorakit.peft import LoraConfig, save_adapter
from lorakit.recipes import reward
from lorakit.train import TrainConfig
from measure import cpu_paths

WORKER = Path(__file__).with_name("rl_worker.py")
MEMORY_TARGET = 1.3  # a PPO step's peak over an SFT step's (issue 11)
STEP_VARIANTS = ("sft", "ppo", "ppo_four_models")
GENERATION_VARIANTS = ("generate_lorakit", "generate_peft")


def save_reward_adapter(model_dir: Path, out: Path, method: str) -> Path:
    """A reward adapter for the saved model as ``lorakit reward`` writes it (untrained: its
    scores do not matter here, its size and its forward pass do)."""
    config = reward.RewardConfig(
        model=ModelConfig(model=str(model_dir), method=method, dtype="float32"),
        train=TrainConfig(out=str(out / "unused")),
        lora=LoraConfig(r=16, alpha=32, dropout=0.0),
    )
    model, _, _ = reward.untrained(config)
    return save_adapter(model, out / "reward_adapter")


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if "error" in a or "error" in b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


def header(args: argparse.Namespace, parameters: int, load: float) -> str:
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {_cpu_model()} ({os.cpu_count()} cores), {cpu_paths()}"
    info = lorakit.build_info()
    return "\n".join(
        [
            f"## RL steps and generation: {where}, {args.threads} torch thread(s)",
            "",
            f"torch {torch.__version__}, transformers {_version('transformers')}, "
            f"peft {_version('peft')}, bitsandbytes {_version('bitsandbytes')}; lorakit "
            f"{info.version}, commit {_commit()}; load average at start {load:.2f}",
            "",
            f"Model: Llama, hidden {args.hidden}, {args.layers} layers, vocabulary "
            f"{args.vocab:,}, {parameters / 1e6:.1f}M parameters, float32; method "
            f"{args.method} (LoRA r 16, alpha 32, every linear layer but the head). Batch "
            f"{args.batch} x ({args.prompt_len} prompt + {args.completion_len} completion "
            f"tokens); PPO {args.updates} update(s) per rollout, one minibatch. {args.warmup} "
            f"warm-up step(s), then {args.steps} timed. Generation: the same prompts, "
            f"{args.gen_tokens} new tokens each, {args.gen_steps} timed calls. One process per "
            "row.",
        ]
    )


def generation_rows(args: argparse.Namespace, spec: dict[str, Any], work: Path) -> None:
    """Runs and prints the two generation variants and their speed ratio."""
    results: dict[str, dict[str, Any]] = {}
    print(
        "\n| generate | median tokens/s | slow end (p90 call) tokens/s | median call (ms) "
        "| p90 call (ms) | median CPU time / call (ms) | peak memory growth (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for variant in GENERATION_VARIANTS:
        run = {
            **spec,
            "variant": variant,
            "steps": args.gen_steps,
            "completion_len": args.gen_tokens,
            "out": str(work / variant),
        }
        results[variant] = r = run_worker(run, WORKER)
        if "error" in r:
            print(f"| {variant} | failed: {r['error']} | | | | | |", flush=True)
            continue
        print(
            f"| {variant} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_p10']:.1f} "
            f"| {r['median_ms']:.0f} | {r['p90_ms']:.0f} | {r['cpu_ms']:.0f} "
            f"| {r['peak_mib']:.0f} |",
            flush=True,
        )
    ours, theirs = (results[v] for v in GENERATION_VARIANTS)
    print(
        f"\nGeneration speed, lorakit / PEFT + bitsandbytes: median "
        f"{_ratio(ours, theirs, 'tokens_per_s')}, slow end "
        f"{_ratio(ours, theirs, 'tokens_per_s_p10')}; CPU time per call, PEFT + bitsandbytes "
        f"/ lorakit: {_ratio(theirs, ours, 'cpu_ms')}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="rows (prompts) per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--updates", type=int, default=1, help="PPO passes per rollout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--gen-steps", type=int, default=5, help="timed generate calls")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens per generate call")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-generation", action="store_true", help="only the step variants")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.pairs = args.batch  # save_model reads the bench_preference names

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        parameters = save_model(args, model_dir)
        adapter = save_reward_adapter(model_dir, work, args.method)
        print(header(args, parameters, load), flush=True)
        spec = {
            "model_dir": str(model_dir), "device": args.device, "method": args.method,
            "batch": args.batch, "prompt_len": args.prompt_len,
            "completion_len": args.completion_len, "updates": args.updates,
            "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
            "reward_adapter": str(adapter),
        }  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        print(
            "\n| variant | models holding a base | median step (ms) | p90 step (ms) "
            "| median CPU time / step (ms) | peak memory growth (MiB) | tensors held (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
        for variant in STEP_VARIANTS:
            run = {**spec, "variant": variant, "steps": args.steps, "out": str(work / variant)}
            results[variant] = r = run_worker(run, WORKER)
            if "error" in r:
                print(f"| {variant} | | failed: {r['error']} | | | | |", flush=True)
                continue
            held = f"{r['tensor_mib']:.0f}" if "tensor_mib" in r else ""
            print(
                f"| {variant} | {r.get('models_held', 1)} | {r['median_ms']:.0f} "
                f"| {r['p90_ms']:.0f} | {r['cpu_ms']:.0f} | {r['peak_mib']:.0f} | {held} |",
                flush=True,
            )
        sft, ppo, four = (results[v] for v in STEP_VARIANTS)
        print(
            f"\nPeak memory: PPO / SFT {_ratio(ppo, sft, 'peak_mib')} (target <= "
            f"{MEMORY_TARGET}x); four models / one base {_ratio(four, ppo, 'peak_mib')} "
            f"(tensors held: {_ratio(four, ppo, 'tensor_mib')})."
        )
        if "error" not in ppo:
            print(
                f"PPO step: sampling {ppo['rollout_s'] * 1000:.0f} ms; reference, values and "
                f"updates {ppo['train_s'] * 1000:.0f} ms (medians; the rest is scoring)."
            )
        if not args.no_generation:
            generation_rows(args, spec, work)
    print(f"Load average at the end: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
