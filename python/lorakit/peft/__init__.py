"""Parameter-efficient fine-tuning: adapters, their injection into torch models, and their files."""

from lorakit.peft.adapters import (
    active_adapter,
    adapter_names,
    disable_adapters,
    lora_layers,
    set_adapter,
)
from lorakit.peft.config import LoraConfig
from lorakit.peft.inject import LoraReport, apply_lora, count_parameters
from lorakit.peft.lora_io import load_adapter, save_adapter
from lorakit.peft.merge import merge_adapter, merge_and_export, unmerge_adapter

__all__ = [
    "LoraConfig",
    "LoraReport",
    "active_adapter",
    "adapter_names",
    "apply_lora",
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
