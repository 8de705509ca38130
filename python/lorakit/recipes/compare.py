"""``lorakit compare``: the same small model fine-tuned on the same task by every method, measured
in one run.

The model is the demo's Llama (``lorakit.recipes.demo.build_llama``), optionally pre-trained for
a few steps on the shipped corpus; the task is the demo's SFT questions (``demo_data/sft.jsonl``, a
tenth held out for validation). Every method trains with the shared :class:`Trainer`, the same
steps, batch size, learning rate and seed, each in a fresh process
(:mod:`lorakit.recipes.compare_worker`) so that its memory peak is its own.

Measured per method:

- trainable parameters, and their share of all parameters (NF4 weights counted by number);
- peak memory: on a GPU ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer
  state, activations); on the CPU how far the training steps raised the process's peak resident
  set size (``getrusage`` max RSS) above its peak once libraries and data were loaded, i.e. what
  the model, the method and training added; allocator caching and the page granularity make it
  coarse (a few MiB) on tiny models. With ``--no-isolate`` (all methods in this process,
  faster) CPU memory is not measured: a process's peak RSS never goes down;
- time per optimizer step: the median after the warm-up steps;
- validation loss before and after training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lorakit.file_writes import write_atomic, write_text_atomic
from lorakit.models import resolve_device
from lorakit.models.tiny import check_width
from lorakit.peft.methods import METHODS
from lorakit.recipes.compare_worker import measure
from lorakit.recipes.demo import (
    DemoConfig,
    build_llama,
    pretrain_config,
    shipped_tokenizer,
    torch_threads,
)
from lorakit.recipes.sft import finetune
from lorakit.validate import check_number

# The best of 1e-4 (full only), 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 by validation loss on the default run;
# IA3 and prefix tuning: the best of 3e-3, 1e-2, 3e-2, 1e-1, 3e-1 (val loss after 40 steps: IA3
# 9.38, 7.95, 4.81, 2.20, 1.78; prefix 8.34, 7.97, 4.88, 2.34, 1.92), the top of that range: a
# higher rate was not tried.
DEFAULT_LRS = ("full=3e-4", "lora=3e-3", "qlora=3e-3", "ia3=3e-1", "prefix=3e-1", "bottleneck=1e-2")


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and on what (the defaults run in about a minute on 2 CPU cores)."""

    out: str = field(
        default="lorakit-compare", metadata={"path": True, "help": "Output directory."}
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Methods to compare (registered: {', '.join(METHODS)})."},
    )
    steps: int = field(default=40, metadata={"help": "Optimizer steps per method."})
    warmup_steps: int = field(
        default=5, metadata={"help": "Steps left out of the median step time (warm-up)."}
    )
    pretrain_steps: int = field(
        default=300,
        metadata={"help": "Steps of full pre-training on the shipped corpus first; 0: none."},
    )
    hidden: int = field(default=128, metadata={"help": "Model width."})
    layers: int = field(default=4, metadata={"help": "Decoder layers."})
    batch_size: int = field(default=16, metadata={"help": "Rows per step."})
    lr: float = field(
        default=1e-3, metadata={"help": "Peak learning rate of the methods not in --method-lr."}
    )
    method_lr: list[str] = field(
        default_factory=lambda: list(DEFAULT_LRS),
        metadata={
            "help": "Per-method peak learning rates as METHOD=LR: each method at the rate that "
            "suits it (the defaults: the best of a sweep on the default run; 3e-4 to 3e-2, IA3 and "
            "prefix 3e-3 to 3e-1)."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA / QLoRA rank (alpha = 2 r)."})
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."}
    )
    isolate: bool = field(
        default=True,
        metadata={
            "help": "Measure each method in a fresh process, so that its memory peak is its own; "
            "--no-isolate is faster (no library import per method) but cannot measure CPU memory."
        },
    )
    threads: int = field(
        default=1,
        metadata={"help": "CPU threads for torch (one: see the demo's --threads)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        resolve_device(self.device)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        for item in self.method_lr:
            method, _, lr = item.partition("=")
            if method not in METHODS or not _is_float(lr):
                raise ValueError(f"method_lr {item!r} is not METHOD=LR with a registered method")
        for name in ("steps", "hidden", "layers", "batch_size", "lora_r", "threads"):
            check_number(name, getattr(self, name), integer=True, low=1)
        check_width(self.hidden)
        for name in ("warmup_steps", "pretrain_steps", "seed"):
            check_number(name, getattr(self, name), integer=True, low=0)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"--warmup-steps {self.warmup_steps} leaves none of the --steps {self.steps} to "
                "time: lower it or raise --steps"
            )
        check_number("lr", self.lr, low=0, low_open=True)
        for item in self.method_lr:
            check_number(f"method_lr {item}", float(item.partition("=")[2]), low=0, low_open=True)

    def lr_of(self, method: str) -> float:
        """``method``'s learning rate: its --method-lr entry, else --lr."""
        rates = dict(item.split("=", 1) for item in self.method_lr)
        return float(rates.get(method, self.lr))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Comparison:
    rows: list[dict[str, Any]]
    table: Path
    chart: Path
    data: Path


def base_model(config: CompareConfig, out: Path) -> Path:
    """The demo's Llama, pre-trained for ``config.pretrain_steps``, as a model directory."""
    tokenizer = shipped_tokenizer()
    demo = DemoConfig(hidden=config.hidden, layers=config.layers, seed=config.seed)
    model = build_llama(demo, tokenizer)
    if config.pretrain_steps == 0:
        model.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        return out / "base"
    pretrain = pretrain_config(
        out / "pretrain", config.seed, config.progress, max_steps=config.pretrain_steps
    )
    return finetune(model, tokenizer, pretrain).saved


def _measure(method: str, model: Path, config: CompareConfig, out: Path) -> dict[str, Any]:
    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    skipped = ("out", "methods", "progress", "isolate", "lr", "method_lr")
    spec = {
        "method": method,
        "model": str(model),
        "out": str(folder / "run"),
        "isolated": False,
        "lr": config.lr_of(method),
        **{k: v for k, v in asdict(config).items() if k not in skipped},
    }
    if not config.isolate:
        with torch_threads(config.threads):
            return measure(spec)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    result = folder / "result.json"
    command = [sys.executable, "-m", "lorakit.recipes.compare_worker", str(folder / "spec.json")]
    done = subprocess.run([*command, str(result)], capture_output=True, text=True, check=False)
    (folder / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{method} failed: {tail[0]} (see {folder / 'stderr.txt'})")
    return json.loads(result.read_text())


def format_table(rows: list[dict[str, Any]]) -> str:
    """The measurements as a Markdown table."""
    memory = "peak GPU memory" if rows[0]["device"].startswith("cuda") else "peak RSS growth"
    lines = [
        f"| method | trainable params | trainable % | {memory} (MiB) | time / step (ms) | "
        "val loss before | val loss after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
            f"{peak} | {r['step_ms']:.1f} | {r['val_loss_before']:.3f} | "
            f"{r['val_loss']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One bar chart per measurement, methods side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    panels = [
        ("trainable_pct", "trainable parameters (%)", True),
        ("peak_mib", "peak memory (MiB)", False),
        ("step_ms", "time per step (ms, median)", False),
        ("val_loss", "final validation loss", False),
    ]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), dpi=100)
    for i, (ax, (key, title, log)) in enumerate(zip(axes, panels, strict=True)):
        ax.bar(names, [r[key] or 0.0 for r in rows], color=f"C{i}")  # None: not measured
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:]))
    finally:
        plt.close(fig)


def run(config: CompareConfig) -> Comparison:
    """Builds the base model, measures every method of ``config.methods``, writes
    ``compare.md``, ``compare.json`` and ``compare.png`` under ``config.out``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(config.threads):
        model = base_model(config, out)
    rows = []
    bar = tqdm(config.methods, desc="compare", disable=not config.progress, dynamic_ncols=True)
    for method in bar:
        bar.set_postfix(method=method)
        rows.append(_measure(method, model, config, out))
    bar.close()
    table, chart, data = out / "compare.md", out / "compare.png", out / "compare.json"
    write_text_atomic(table, format_table(rows) + "\n")
    write_text_atomic(data, json.dumps({"config": asdict(config), "rows": rows}, indent=2) + "\n")
    plot(rows, chart)
    return Comparison(rows=rows, table=table, chart=chart, data=data)


def main(config: CompareConfig) -> str:
    """``lorakit compare``: runs the comparison; returns the table and where the files are."""
    result = run(config)
    return (
        f"{format_table(result.rows)}\n"
        f"table {result.table}; data {result.data}; chart {result.chart}"
    )
