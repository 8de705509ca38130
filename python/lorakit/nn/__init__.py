"""Layers: frozen NF4 linears, LoRA adapters around them, bottleneck adapters after sub-blocks."""

from lorakit.nn.bottleneck import BottleneckAdapter, BottleneckBlock
from lorakit.nn.lora_linear import LoRALinear
from lorakit.nn.nf4_linear import NF4Linear

__all__ = ["BottleneckAdapter", "BottleneckBlock", "LoRALinear", "NF4Linear"]
