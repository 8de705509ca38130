"""Parameter-efficient fine-tuning: configuration and injection of adapters into torch models."""

from lorakit.peft.config import LoraConfig
from lorakit.peft.inject import LoraReport, apply_lora, count_parameters

__all__ = ["LoraConfig", "LoraReport", "apply_lora", "count_parameters"]
