"""Layers: frozen NF4 linears and the adapters around them (LoRA, IA3), bottleneck adapters after
sub-blocks, built on the native ops."""

from lorakit.nn.adapter_layer import AdapterLayer
from lorakit.nn.bottleneck import BottleneckAdapter, BottleneckBlock
from lorakit.nn.ia3_linear import IA3Linear
from lorakit.nn.lora_linear import LoRALinear
from lorakit.nn.nf4_linear import NF4Linear

__all__ = [
    "AdapterLayer",
    "BottleneckAdapter",
    "BottleneckBlock",
    "IA3Linear",
    "LoRALinear",
    "NF4Linear",
]
