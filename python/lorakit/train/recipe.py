"""What SFT and continued pre-training share: load a model, make it trainable (a method of
:data:`lorakit.peft.methods.METHODS`: full, LoRA, QLoRA, bottleneck adapters, ...), prepare the
data, run the :class:`Trainer`, save the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lorakit.data import DataConfig, PreparedData, prepare
from lorakit.peft import (
    AdapterReport,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    save_adapter,
)
from lorakit.peft.methods import MethodName, apply_method, methods_help
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer, TrainResult

METHODS = get_args(MethodName)
ADAPTER_DIR = "adapter"
# The --dtype choices that name a torch dtype ("auto" keeps the checkpoint's).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    model: str = field(
        default="",
        metadata={"help": "Local directory of a Hugging Face causal LM and its tokenizer."},
    )
    method: MethodName = field(default="qlora", metadata={"help": methods_help()})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto keeps the checkpoint's (torch_dtype in config)."},
    )
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")


@dataclass
class RunConfig:
    """A recipe's whole configuration; the CLI's options are generated from these fields."""

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


def _model_dir(config: ModelConfig) -> Path:
    path = Path(config.model)
    if not config.model or not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} does not exist or has no config.json")
    return path


def load_tokenizer(config: ModelConfig) -> Any:
    """The tokenizer of a local model directory (never downloaded).

    Raises:
        ValueError: the directory does not exist or holds no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    path = _model_dir(config)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None


def load_model(config: ModelConfig) -> nn.Module:
    """The causal LM of a local model directory (never downloaded), on ``config.device``.

    Raises:
        ValueError: the directory does not exist or holds no loadable causal LM.
    """
    from transformers import AutoModelForCausalLM

    path = _model_dir(config)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a causal LM from {path}: {e}") from None
    return model.to(device)


def make_trainable(model: nn.Module, method: str, config: RunConfig) -> AdapterReport:
    """Applies ``method`` in place, with its options from ``config`` (e.g. ``config.lora``)."""
    return apply_method(model, method, config)


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
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target
    return save_adapter(model, target)


def pad_id(tokenizer: Any) -> int:
    """The token that pads batches: the tokenizer's pad token, else its end of sequence, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def train_and_save(
    model: nn.Module, tokenizer: Any, config: RunConfig, data: PreparedData
) -> tuple[TrainResult, Path]:
    """Trains a model that :func:`make_trainable` prepared, and saves the result (under torchrun,
    rank 0 saves; every rank returns the path)."""
    if config.train.progress and distributed.is_main():
        print(data.report)
    trainer = Trainer(model, config.train, data.train, data.val, pad_id(tokenizer))
    result = trainer.fit()
    if distributed.is_main():
        save_result(model, tokenizer, config)
    return result, result_path(config)


def _trained(model: nn.Module, tokenizer: Any, config: RunConfig, data: PreparedData) -> RunResult:
    torch.manual_seed(config.train.seed)  # adapters' init and dropout
    report = make_trainable(model, config.model.method, config)
    result, saved = train_and_save(model, tokenizer, config, data)
    return RunResult(model, tokenizer, result, report.trainable, report.total, saved)


def finetune(model: nn.Module, tokenizer: Any, config: RunConfig) -> RunResult:
    """Trains an already loaded ``model`` as ``config`` says and saves the result."""
    return _trained(model, tokenizer, config, prepare(config.data, tokenizer, config.train.seed))


def run(config: RunConfig) -> RunResult:
    """Loads ``config.model.model`` and fine-tunes it; the data is read first, so that a bad
    data file is reported before a large model is loaded."""
    tokenizer = load_tokenizer(config.model)
    data = prepare(config.data, tokenizer, config.train.seed)
    return _trained(load_model(config.model), tokenizer, config, data)
