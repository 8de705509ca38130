"""lorakit: fast, memory-lean LoRA / QLoRA fine-tuning for PyTorch."""

from lorakit import nn, ops, optim, peft, quant
from lorakit._native import BuildInfo, build_info
from lorakit.peft import LoraConfig, apply_lora

__all__ = [
    "BuildInfo",
    "LoraConfig",
    "apply_lora",
    "build_info",
    "nn",
    "ops",
    "optim",
    "peft",
    "quant",
]
