"""What every training recipe shares: its configuration groups, making the model trainable (a
method of :data:`lorakit.peft.methods.METHODS`), training it with the :class:`Trainer` on an
objective, and saving the result."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lorakit.data import DataConfig, Pair
from lorakit.model_dirs import check_replaceable, replaced_atomically
from lorakit.models import ModelConfig
from lorakit.models.positions import check_positions
from lorakit.models.vocab import check_token_ids
from lorakit.peft import (
    AdapterReport,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    save_adapter,
)
from lorakit.peft.methods import apply_method
from lorakit.train import (
    Objective,
    RowBatches,
    TrainConfig,
    Trainer,
    TrainResult,
    distributed,
    fsdp,
    out_dir,
    precision,
)
from lorakit.train.batches import Batch

ADAPTER_DIR = "adapter"
RowT = TypeVar("RowT")


@dataclass
class RunConfig:
    """The configuration groups of every training recipe; a recipe's own config adds its groups.
    The CLI's options and YAML keys are generated from these fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    ia3: IA3Config = field(default_factory=IA3Config)
    prefix: PrefixTuningConfig = field(default_factory=PrefixTuningConfig)


@dataclass(frozen=True)
class RunResult:
    model: nn.Module
    tokenizer: Any
    train: TrainResult
    trainable: int
    total: int
    saved: Path


def make_trainable(model: nn.Module, config: RunConfig) -> AdapterReport:
    """Seeds torch with ``config.train.seed`` (adapter initialisation, dropout), then applies
    ``config.model.method`` in place with its options from ``config`` (e.g. ``config.lora``)."""
    torch.manual_seed(config.train.seed)
    return apply_method(model, config.model.method, config)


def result_path(config: RunConfig) -> Path:
    """Where :func:`save_result` writes: ``out/model`` (full) or ``out/adapter``."""
    return Path(config.train.out) / ("model" if config.model.method == "full" else ADAPTER_DIR)


def save_result(model: nn.Module, tokenizer: Any, config: RunConfig) -> Path:
    """Full fine-tuning: a Hugging Face model directory. Every other method: the adapter written
    by :func:`lorakit.save_adapter` (PEFT's format for LoRA / QLoRA, IA3 and prefix tuning,
    lorakit's own for bottleneck adapters), which :func:`lorakit.load_adapter` loads; its
    ``base_model_name_or_path`` is the model directory the run loaded."""
    target = result_path(config)
    if config.model.method == "full":
        # Atomically: a failed write (a full disk) keeps an earlier run's model whole.
        with replaced_atomically(target, overwrite=True, inputs=_inputs(config)) as new:
            model.save_pretrained(new)
            tokenizer.save_pretrained(new)
        return target
    return save_adapter(model, target)


def _inputs(config: RunConfig) -> tuple[Path, ...]:
    """What a run reads, which its result must not replace (``--out`` holding ``--model``).
    ``--model`` counts when it is a local path: not a hub id, nor empty (a model built in
    Python, as the demo's pre-training builds one), which as a path would be the current
    directory."""
    model = Path(config.model.model) if config.model.model else None
    local = (model,) if model is not None and model.exists() else ()
    return (*local, *map(Path, config.data.data))


def batches(
    config: RunConfig, rows: Sequence[RowT], collate: Callable[[list[RowT]], Batch]
) -> RowBatches[RowT]:
    """``rows`` in micro-batches of ``config.train.batch_size``, shuffled with its seed."""
    return RowBatches(rows, config.train.batch_size, collate, config.train.seed)


def check_pairs_fit(model: nn.Module, pairs: Iterable[Pair], pad: int) -> None:
    """Refuses preference ``pairs`` (DPO's, a reward model's) longer than the model's positions
    or holding a token, the ``pad`` that batches add included, it has no embedding for."""
    pairs = list(pairs)
    check_positions(model, map(len, pairs))
    sides = (side.input_ids for p in pairs for side in (p.chosen, p.rejected))
    check_token_ids(model, sides, {"pad": pad})


def train_and_save(
    model: nn.Module,
    tokenizer: Any,
    config: RunConfig,
    objective: Objective,
    train: RowBatches[Any],
    val: RowBatches[Any],
    report: AdapterReport,
    data_report: object,
    rows_digest: str | None = None,
) -> RunResult:
    """Trains a model that :func:`make_trainable` prepared on ``objective`` and saves the result
    (under torchrun rank 0 saves; every rank returns the path). ``data_report`` is printed first
    when progress is shown; ``rows_digest`` goes to the :class:`~lorakit.train.Trainer`."""
    if config.train.progress and distributed.is_main():
        print(data_report)
        bf16 = precision.describe(config.train.autocast, next(model.parameters()).device)
        if bf16 is not None:
            print(bf16)
    if config.model.method == "full":  # refused now, not after training
        check_replaceable(result_path(config), True, _inputs(config))
    # The lock spans training and saving, so no other run writes out between them.
    with out_dir.claim(Path(config.train.out)):
        trainer = Trainer(model, config.train, objective, train, val, config, rows_digest)
        result = trainer.fit()
        # Under FSDP every rank gathers the trained parameters; rank 0 writes them once.
        with fsdp.whole_trainable(model):
            if distributed.is_main():
                save_result(model, tokenizer, config)
    return RunResult(model, tokenizer, result, report.trainable, report.total, result_path(config))


def summary(result: RunResult) -> str:
    """What a training command prints when it is done."""
    share = result.trainable / max(1, result.total)
    trained = result.train
    best = trained.best_val_loss
    return "\n".join(
        [
            f"trained {trained.steps} steps in {trained.seconds:.0f} s; last loss "
            f"{trained.last_loss:.4f}"
            + ("" if best is None else f"; best validation loss {best:.4f}"),
            f"trainable parameters: {result.trainable:,} of {result.total:,} ({share:.2%})",
            f"saved {result.saved}; metrics {trained.metrics}; plot {trained.plot}",
        ]
    )
