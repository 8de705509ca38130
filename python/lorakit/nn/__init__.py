"""Layers: frozen NF4 linears and LoRA adapters around them, built on the native ops."""

from lorakit.nn.lora_linear import LoRALinear
from lorakit.nn.nf4_linear import NF4Linear

__all__ = ["LoRALinear", "NF4Linear"]
