"""lorakit: fast, memory-lean LoRA / QLoRA (and IA3, prefix tuning) fine-tuning for PyTorch."""

from lorakit import nn, ops, optim, peft, quant
from lorakit._native import BuildInfo, build_info
from lorakit.peft import (
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PrefixTuningConfig,
    apply_ia3,
    apply_lora,
    apply_prefix_tuning,
    disable_adapters,
    load_adapter,
    merge_adapter,
    merge_and_export,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)

__all__ = [
    "BuildInfo",
    "IA3Config",
    "LoraConfig",
    "PrefixConfig",
    "PrefixTuningConfig",
    "apply_ia3",
    "apply_lora",
    "apply_prefix_tuning",
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
