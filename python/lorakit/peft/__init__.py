"""Parameter-efficient fine-tuning: adapters, their injection into torch models, and their files."""

from lorakit.peft.adapters import (
    active_adapter,
    adapter_names,
    disable_adapters,
    lora_layers,
    set_adapter,
)
from lorakit.peft.bottleneck import apply_bottleneck, bottleneck_layers
from lorakit.peft.bottleneck_config import BottleneckConfig
from lorakit.peft.config import LoraConfig
from lorakit.peft.full import apply_full
from lorakit.peft.inject import LoraReport, apply_lora, count_parameters
from lorakit.peft.lora_io import load_adapter, save_adapter
from lorakit.peft.merge import merge_adapter, merge_and_export, unmerge_adapter

__all__ = [
    "BottleneckConfig",
    "LoraConfig",
    "LoraReport",
    "active_adapter",
    "adapter_names",
    "apply_bottleneck",
    "apply_full",
    "apply_lora",
    "bottleneck_layers",
    "count_parameters",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_and_export",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
