"""Parameter-efficient fine-tuning: adapters, their injection into torch models, and their files."""

from lorakit.peft.adapter_io import AdapterFormat, load_adapter, register_format, save_adapter
from lorakit.peft.adapters import (
    active_adapter,
    adapter_layers,
    adapter_names,
    disable_adapters,
    lora_layers,
    set_adapter,
    using_adapter,
)
from lorakit.peft.bottleneck import apply_bottleneck, bottleneck_layers
from lorakit.peft.bottleneck_config import BottleneckConfig
from lorakit.peft.config import LoraConfig
from lorakit.peft.export import merge_and_export
from lorakit.peft.full import apply_full
from lorakit.peft.ia3 import IA3Config, apply_ia3
from lorakit.peft.inject import AdapterReport, LoraReport, apply_lora, count_parameters
from lorakit.peft.merge import merge_adapter, unmerge_adapter
from lorakit.peft.prefix import PrefixConfig, PrefixTuningConfig, apply_prefix_tuning

__all__ = [
    "AdapterFormat",
    "AdapterReport",
    "BottleneckConfig",
    "IA3Config",
    "LoraConfig",
    "LoraReport",
    "PrefixConfig",
    "PrefixTuningConfig",
    "active_adapter",
    "adapter_layers",
    "adapter_names",
    "apply_bottleneck",
    "apply_full",
    "apply_ia3",
    "apply_lora",
    "apply_prefix_tuning",
    "bottleneck_layers",
    "count_parameters",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_and_export",
    "register_format",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
    "using_adapter",
]
