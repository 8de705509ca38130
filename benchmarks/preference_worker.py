"""One configuration of ``bench_preference.py``, measured in a process of its own.

Run as ``python benchmarks/preference_worker.py SPEC.json RESULT.json``. A fresh process per
configuration, so that its memory peak is its own (a process's peak RSS never goes down, and
torch's CPU allocator keeps freed memory) and one configuration's warm caches cannot speed up
the next. The spec names the library (``lorakit`` or ``trl``), the step (``dpo`` or
``reward``), the method (``lora`` or ``qlora``), the saved model directory and the sizes.

Both libraries train on the same synthetic pairs (token ids drawn from the whole vocabulary,
every sequence exactly ``prompt_len + completion_len`` tokens, so every batch has the same
shape in both), with the same batch size, LoRA settings (rank 16, alpha 32, no dropout, every
linear layer but the output head), learning rate, cosine schedule with 10% warmup, gradient
clipping at 1.0 and no weight decay. lorakit steps with its own AdamW, TRL with transformers'
default (``adamw_torch_fused``). Only optimizer steps are timed: lorakit's ``Trainer._step``;
for TRL, a callback from ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping,
optimizer and scheduler step, zeroing), so data loading and logging are outside both.

Memory: on the CPU the growth of peak RSS over the RSS just before the first step (model and
data loaded, :class:`lorakit.recipes.compare_worker.CpuPeak`); on CUDA ``max_memory_allocated``
over the memory allocated then. Both include the optimizer state created by the first step.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lorakit.data import Pair, collate_pairs
from lorakit.data.encode import IGNORE, Example
from lorakit.models import ModelConfig, load_model, load_tokenizer, pad_id
from lorakit.peft import LoraConfig
from lorakit.recipes import dpo, reward
from lorakit.recipes.common import batches, make_trainable
from lorakit.recipes.compare_worker import CpuPeak
from lorakit.train import Objective, TrainConfig, Trainer
from lorakit.train.objectives.dpo import ADAPTERS_OFF, DPOObjective
from lorakit.train.objectives.reward import RewardObjective

Triple = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected token ids

LORA_R = 16
LORA_ALPHA = 32
WARMUP_SHARE = 0.1
MAX_GRAD_NORM = 1.0
BETA = 0.1


class Peak:
    """Peak memory growth (MiB) from :meth:`start` on: CPU peak RSS or CUDA allocations."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu: CpuPeak | None = None
        self.base = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.cpu = CpuPeak()

    def growth(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        if self.cpu is None:
            raise RuntimeError("Peak.growth() before start()")
        return self.cpu.growth()


class StepClock:
    """Each step's wall time and the process's CPU time (all threads) in it. On a shared
    machine the CPU time moves far less with the load than the wall time does."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._tic = (0.0, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        self._sync()
        self._tic = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        self._sync()
        self.wall.append(time.perf_counter() - self._tic[0])
        self.cpu.append(time.process_time() - self._tic[1])

    def times(self) -> dict[str, list[float]]:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


def step_stats(wall: list[float], cpu: list[float], warmup: int) -> dict[str, float]:
    """Median and p90 wall milliseconds and median CPU milliseconds of the steps after
    ``warmup``."""
    timed = wall[warmup:]
    deciles = statistics.quantiles(timed, n=10, method="inclusive") if len(timed) > 1 else timed
    return {
        "median_ms": 1000 * statistics.median(timed),
        "p90_ms": 1000 * deciles[-1],
        "cpu_ms": 1000 * statistics.median(cpu[warmup:]),
    }


def synthetic_triples(spec: dict[str, Any], tokenizer: Any) -> list[Triple]:
    """``pairs * (warmup + steps)`` preference pairs of random ordinary tokens; each completion
    ends with the end-of-sequence token (so TRL adds none, and both libraries see the same ids)."""
    generator = torch.Generator().manual_seed(spec["seed"])
    low = max(tokenizer.all_special_ids) + 1
    count = spec["pairs"] * (spec["warmup"] + spec["steps"])

    def draw(n: int) -> list[int]:
        return torch.randint(low, len(tokenizer), (n,), generator=generator).tolist()

    eos = tokenizer.eos_token_id
    completion = spec["completion_len"] - 1
    return [
        (draw(spec["prompt_len"]), [*draw(completion), eos], [*draw(completion), eos])
        for _ in range(count)
    ]


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> Pair:
    def example(completion: list[int]) -> Example:
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion)

    return Pair(example(chosen), example(rejected), len(prompt), 0.0)


def _lorakit(spec: dict[str, Any], triples: list[Triple], peak: Peak) -> dict[str, Any]:
    config_class = reward.RewardConfig if spec["step"] == "reward" else dpo.DPOConfig
    config = config_class(
        model=ModelConfig(
            model=spec["model_dir"], method=spec["method"], device=spec["device"], dtype="float32"
        ),
        train=TrainConfig(
            out=spec["out"], max_steps=spec["warmup"] + spec["steps"], batch_size=spec["pairs"],
            lr=spec["lr"], weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, schedule="cosine",
            warmup=WARMUP_SHARE, seed=spec["seed"], resume=False, progress=False,
            gradient_checkpointing=spec["gradient_checkpointing"],
        ),
        lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0),
    )  # fmt: skip
    if spec["step"] == "reward":
        model, tokenizer, report = reward.untrained(config)
        objective: Objective = RewardObjective()
    else:
        tokenizer = load_tokenizer(config.model)
        model = load_model(config.model)
        report = make_trainable(model, config)
        # As lorakit dpo trains an adapter: the reference is the model with its adapters off.
        objective = DPOObjective(ADAPTERS_OFF, beta=BETA)
    collate = partial(collate_pairs, pad_id=pad_id(tokenizer))
    rows = batches(config, [_pair(*t) for t in triples], collate)
    trainer = Trainer(model, config.train, objective, rows)
    model.train()  # as Trainer.fit does before its steps
    clock = StepClock(trainer.device)
    peak.start()
    for step in range(spec["warmup"] + spec["steps"]):
        clock.begin()
        trainer._step(step)
        clock.end()
    return {
        **clock.times(),
        "peak_mib": peak.growth(),
        "trainable": report.trainable,
        "optimizer": "lorakit AdamW (32-bit state)",
    }


def _step_timer(device: torch.device, peak: Peak) -> Any:
    """A transformers callback: starts the memory peak at ``on_train_begin`` (model, data and
    optimizer built, no step run) and times each optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.clock = StepClock(device)

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            peak.start()

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.clock.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.clock.end()

    return StepTimer()


def _trl_args(spec: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """TrainingArguments shared by TRL's DPOConfig and RewardConfig; everything not named keeps
    TRL's default (no liger kernel, no precomputed reference, dropout disabled)."""
    return {
        "output_dir": spec["out"],
        "per_device_train_batch_size": spec["pairs"],
        "max_steps": spec["warmup"] + spec["steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": WARMUP_SHARE,  # below 1: a share of the steps
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        # TRL turns bf16 autocast on by default; on the CPU it is off, as lorakit's autocast is.
        "bf16": cuda,
        "use_cpu": not cuda,
        "seed": spec["seed"],
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": spec["warmup"] + spec["steps"],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": None,
        "model_init_kwargs": {"dtype": torch.float32},
    }


def _trl_lora(step: str) -> Any:
    import peft

    if step == "reward":  # the score head trains whole, as lorakit's does
        return peft.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
            task_type="SEQ_CLS", modules_to_save=["score"],
        )  # fmt: skip
    return peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def _trl_quantization(method: str, cuda: bool) -> Any:
    if method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    # QLoRA as usually configured: NF4, double quantization, compute in the activations' dtype.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )


def _trl(spec: dict[str, Any], triples: list[Triple], peak: Peak) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    timer = _step_timer(torch.device(spec["device"]), peak)
    common = {
        "model": spec["model_dir"],  # TRL loads it, quantized for qlora
        "processing_class": tokenizer,
        "peft_config": _trl_lora(spec["step"]),
        "quantization_config": _trl_quantization(spec["method"], cuda),
        "callbacks": [timer],
    }
    if spec["step"] == "reward":
        # Already tokenized (chosen_ids / rejected_ids): TRL uses the ids as given.
        data = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in triples]
        trainer: Any = trl.RewardTrainer(
            args=trl.RewardConfig(**_trl_args(spec, cuda)),
            train_dataset=Dataset.from_list(data),
            **common,
        )
    else:
        # TRL's DPO tokenizes text; the word-level vocabulary maps these words back to the ids.
        def text(ids: list[int]) -> str:
            return " ".join(tokenizer.convert_ids_to_tokens(ids))

        data = [
            {"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
            for p, c, r in triples
        ]
        trainer = trl.DPOTrainer(
            ref_model=None,
            args=trl.DPOConfig(**_trl_args(spec, cuda), beta=BETA, precompute_ref_log_probs=False),
            train_dataset=Dataset.from_list(data),
            **common,
        )
        _check_same_ids(trainer.train_dataset, triples)
    trainer.train()
    return {
        **timer.clock.times(),
        "peak_mib": peak.growth(),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": f"torch {trainer.args.optim.value}",
    }


def _check_same_ids(dataset: Any, triples: list[Triple]) -> None:
    for i, (row, (p, c, r)) in enumerate(zip(dataset, triples, strict=True)):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (p, c, r):
            raise RuntimeError(f"TRL tokenized pair {i} into other ids than lorakit trains on")


RUNNERS: dict[str, Callable[[dict[str, Any], list[Triple], Peak], dict[str, Any]]] = {
    "lorakit": _lorakit,
    "trl": _trl,
}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one configuration: every step's wall and CPU seconds (warm-up first), the medians
    and wall p90 of the timed steps, the memory peak and the trainable parameters."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    triples = synthetic_triples(spec, tokenizer)
    result = RUNNERS[spec["library"]](spec, triples, Peak(torch.device(spec["device"])))
    return {
        **result,
        **step_stats(result["seconds"], result["cpu_seconds"], spec["warmup"]),
        "threads": torch.get_num_threads(),
    }


def serve(measure_spec: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str]) -> int:
    """A worker process's entry (``worker SPEC.json RESULT.json``, see bench_preference.run_worker):
    measures the spec at its thread count and writes the result."""
    spec_path, result_path = (Path(a) for a in argv)
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    result_path.write_text(json.dumps(measure_spec(spec), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(serve(measure, sys.argv[1:]))
