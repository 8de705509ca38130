"""One trainer of ``bench_sft_trl.py`` in a process of its own, timed per optimizer step.

Run as ``python benchmarks/sft_trl_worker.py SPEC.json RESULT.json``. The spec names the trainer
(``lorakit``: the ``lorakit sft`` command, run in this process through ``lorakit.cli.main``;
``trl``: TRL's ``SFTTrainer`` with a PEFT ``LoraConfig`` over a bitsandbytes 4-bit model), the
converted model directory (and for lorakit the GGUF file the command is given), the data file,
batch size, sequence length, rank, steps and TRL's precision.

Both trainers are timed the same way, from outside their code: torch's global optimizer-step
hook records when each optimizer step ends, and a step's time is the wall time (and the
process's CPU time) between the end of the previous step and the end of this one (data,
forward, backward, clipping, the update, the loop's own bookkeeping). With ``threads`` set, torch
uses that many threads in both. A global forward hook on embedding layers records the shape of
every batch each trainer feeds its model, to show that both train on rows of the same size.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepTimes:
    """Wall-clock times at which optimizer steps end, and the (batch, tokens) shapes the model
    was fed, recorded through torch's global hooks."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.shapes: set[tuple[int, ...]] = set()
        self.threads = 0
        self._handles = [
            register_optimizer_step_post_hook(self._on_step),
            nn.modules.module.register_module_forward_pre_hook(self._on_forward),
        ]

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if len(self.ends) > 1:  # progress on stderr: a slow trainer shows it is alive
            print(f"step {len(self.ends)}: {self.ends[-1] - self.ends[-2]:.1f} s", file=sys.stderr)
        self.threads = torch.get_num_threads()  # as the trainer left it, inside its loop

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, nn.Embedding) and args and isinstance(args[0], torch.Tensor):
            self.shapes.add(tuple(args[0].shape))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    @staticmethod
    def intervals(ends: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(ends)]


def run_lorakit(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """``lorakit sft --method qlora`` at its defaults, with the data, batch, sequence length,
    rank and target modules the benchmark fixes for both trainers."""
    from lorakit.cli import main

    argv = [
        "sft",
        "--model",
        spec["gguf"],
        "--method",
        "qlora",
        "--data",
        spec["data"],
        "--batch-size",
        str(spec["batch"]),
        "--seq-len",
        str(spec["seq_len"]),
        "--lora-r",
        str(spec["rank"]),
        "--lora-target-modules",
        "all-linear",
        "--max-steps",
        str(spec["steps"]),
        # Same rows as TRL's: every row trains (TRL holds none out) and none is dropped as a
        # near-duplicate (TRL does not deduplicate).
        "--val-fraction",
        "0",
        "--dedup",
        "none",
        "--out",
        str(out),
        "--no-progress",
    ]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"lorakit sft exited with {code}")
    return {}


def run_trl(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` at TRL's defaults, but for the data, batch, sequence length, rank,
    target modules and steps the benchmark fixes for both trainers; the base loaded in 4-bit
    NF4 with double quantization by bitsandbytes, LoRA by PEFT."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    # TRL's own 4-bit config (trl.get_quantization_config) computes in the model's dtype, which
    # TRL loads as float32 unless told otherwise; NF4 with double quantization as the QLoRA
    # paper and lorakit's default.
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    # bf16=None is TRL's default (it becomes True unless fp16 is set); on a machine without a
    # GPU transformers refuses bf16 unless use_cpu is set, so use_cpu=True is what a TRL user
    # on this machine must add.
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=spec["batch"],
        max_length=spec["seq_len"],
        max_steps=spec["steps"],
        use_cpu=True,
        bf16=spec["trl_bf16"],
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    peft_config = LoraConfig(r=spec["rank"], target_modules="all-linear", task_type="CAUSAL_LM")
    data = load_dataset("json", data_files=spec["data"], split="train")
    trainer = SFTTrainer(
        model=spec["model_dir"],
        args=args,
        train_dataset=data,
        quantization_config=quantization,
        peft_config=peft_config,
    )
    settings = {
        name: str(getattr(args, name))
        for name in (
            "bf16",
            "gradient_checkpointing",
            "packing",
            "padding_free",
            "optim",
            "learning_rate",
            "lr_scheduler_type",
            "logging_steps",
            "completion_only_loss",
            "dataloader_num_workers",
        )
    }
    settings["attn_implementation"] = str(trainer.model.config._attn_implementation)
    settings["lora_dtype"] = str(
        next(p.dtype for n, p in trainer.model.named_parameters() if "lora_A" in n)
    )
    trainer.train()
    return {"trl_settings": settings}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    clock = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        extra = (run_lorakit if spec["trainer"] == "lorakit" else run_trl)(spec, Path(out))
    clock.close()
    result = {
        "intervals": clock.intervals(clock.ends),
        "cpu_intervals": clock.intervals(clock.cpu_ends),
        "steps": len(clock.ends),
        "shapes": sorted(clock.shapes),
        "threads": clock.threads,
        **extra,
    }
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
