"""lorakit: fast, memory-lean LoRA / QLoRA fine-tuning for PyTorch."""

from lorakit import nn, ops, optim, peft, quant
from lorakit._native import BuildInfo, build_info
from lorakit.peft import (
    BottleneckConfig,
    LoraConfig,
    apply_bottleneck,
    apply_full,
    apply_lora,
    disable_adapters,
    load_adapter,
    merge_adapter,
    merge_and_export,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)

__all__ = [
    "BottleneckConfig",
    "BuildInfo",
    "LoraConfig",
    "apply_bottleneck",
    "apply_full",
    "apply_lora",
    "build_info",
    "disable_adapters",
    "load_adapter",
    "merge_adapter",
    "merge_and_export",
    "nn",
    "ops",
    "optim",
    "peft",
    "quant",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
