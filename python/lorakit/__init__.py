"""lorakit: fast, memory-lean LoRA / QLoRA fine-tuning for PyTorch."""

from lorakit import ops, optim, quant
from lorakit._native import BuildInfo, build_info

__all__ = ["BuildInfo", "build_info", "ops", "optim", "quant"]
