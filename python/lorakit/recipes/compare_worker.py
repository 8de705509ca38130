"""One method of ``lorakit compare``, measured in a process of its own.

Run as ``python -m lorakit.recipes.compare_worker SPEC.json RESULT.json``: a fresh process per
method, so that its peak memory is its own (a process's peak RSS never goes down, and torch's
CPU allocator keeps freed memory), and one method's warm caches cannot speed up the next.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lorakit.data import collate, prepare
from lorakit.models import ModelConfig, load_model, load_tokenizer, pad_id
from lorakit.peft import LoraConfig
from lorakit.recipes.common import RunConfig, batches, make_trainable
from lorakit.recipes.demo import sft_data_config, torch_threads
from lorakit.train import TrainConfig, Trainer
from lorakit.train.metrics import peak_memory_mib
from lorakit.train.objectives import CausalLMObjective

_STATUS = Path("/proc/self/status")


def _status_mib(key: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 2**10  # kB
    raise OSError(f"{key} not in {_STATUS}")


class CpuPeak:
    """How far the process's resident set size peaks above its size now.

    On Linux the kernel's peak mark (``VmHWM``) is reset to the current RSS (writing 5 to
    ``/proc/self/clear_refs``, Linux 4.0+), so the transient peaks of importing libraries and
    preparing data do not hide a small model's; elsewhere the peak is ``getrusage``'s max RSS,
    which never goes down, and the growth is measured from the peak so far.
    """

    def __init__(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start, self.exact = _status_mib("VmRSS"), True
        except OSError:
            self.start, self.exact = peak_memory_mib(torch.device("cpu")), False

    def growth(self) -> float:
        peak = _status_mib("VmHWM") if self.exact else peak_memory_mib(torch.device("cpu"))
        return peak - self.start


class _TimedTrainer(Trainer):
    """Records each optimizer step's wall time and the memory peak reached by the steps alone
    (the checkpoint written at the end serialises the whole state and would count otherwise)."""

    def __init__(self, *args: Any, cpu_peak: CpuPeak, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_seconds: list[float] = []
        self.cpu_peak = cpu_peak
        self.peak_mib = 0.0

    def _step(self, step: int) -> tuple[dict[str, float], int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tic = time.perf_counter()
        out = super()._step(step)  # .item() on the loss already waits for the GPU
        self.step_seconds.append(time.perf_counter() - tic)
        cuda = self.device.type == "cuda"
        self.peak_mib = peak_memory_mib(self.device) if cuda else self.cpu_peak.growth()
        return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tunes ``spec["model"]`` with ``spec["method"]`` and returns its measurements."""
    r = spec["lora_r"]
    config = RunConfig(
        model=ModelConfig(model=spec["model"], method=spec["method"], device=spec["device"]),
        data=sft_data_config(),
        train=TrainConfig(
            out=spec["out"], max_steps=spec["steps"], batch_size=spec["batch_size"],
            lr=spec["lr"], seed=spec["seed"], resume=False, progress=False,
        ),
        lora=LoraConfig(r=r, alpha=2 * r),
    )  # fmt: skip
    tokenizer = load_tokenizer(config.model)
    data = prepare(config.data, tokenizer, spec["seed"])
    cpu_peak = CpuPeak()  # libraries and data loaded, no model yet
    gpu_before = 0.0
    if torch.cuda.is_available():  # a clean peak, also when methods share a process
        gpu_before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    model = load_model(config.model)
    device = next(model.parameters()).device
    report = make_trainable(model, config)
    pad = pad_id(tokenizer)
    rows = partial(collate, pad_id=pad)
    trainer = _TimedTrainer(
        model,
        config.train,
        CausalLMObjective(pad, fused_ce=config.train.fused_ce),
        batches(config, data.train, rows),
        batches(config, data.val, rows),
        cpu_peak=cpu_peak,
    )
    val_before = trainer.evaluate()["loss"]
    result = trainer.fit()
    peak: float | None = trainer.peak_mib - (gpu_before if device.type == "cuda" else 0.0)
    if device.type == "cpu" and not spec["isolated"]:
        peak = None  # earlier methods' freed memory stays in the process and would be reused
    timed = trainer.step_seconds[spec["warmup_steps"] :]  # CompareConfig leaves one at least
    return {
        "method": spec["method"],
        "trainable": report.trainable,
        "total": report.total,
        "trainable_pct": 100.0 * report.trainable / report.total,
        "peak_mib": peak,
        "step_ms": 1000.0 * statistics.median(timed or trainer.step_seconds),
        "val_loss_before": val_before,
        "val_loss": result.best_val_loss,
        "steps": result.steps,
        "device": str(device),
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = (Path(a) for a in argv)
    spec = {**json.loads(spec_path.read_text()), "isolated": True}
    with torch_threads(spec["threads"]):
        result = measure(spec)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
