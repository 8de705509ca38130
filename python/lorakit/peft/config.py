"""Configuration of LoRA / QLoRA injection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.ops import NF4_BLOCKSIZES

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Which layers get a LoRA adapter, its size, and how the frozen base is stored."""

    r: int = field(default=8, metadata={"help": "Rank of the update B A (1 to min(in, out))."})
    alpha: float = field(
        default=16.0,
        metadata={"help": "Scaling numerator: the update is multiplied by alpha / r."},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the low-rank path's input while training (PEFT's)."},
    )
    target_modules: list[str] | str = field(
        default=ALL_LINEAR,
        metadata={
            "help": "Layers to adapt: a list of names, each matching a module's full name or its "
            "last components (e.g. 'q_proj', 'mlp.down_proj'); a string is a regular expression "
            "that must match the full name; 'all-linear' takes every linear layer except the "
            "output projection (lm_head)."
        },
    )
    quantize: Literal["nf4"] | None = field(
        default=None,
        metadata={"help": "Store the adapted layers' frozen weights in 4-bit NF4 (QLoRA)."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilized)."},
    )
    blocksize: int = field(
        default=64, metadata={"help": "Weights per NF4 scale (32 to 4096, a power of two)."}
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "Store NF4 scales in 8 bits (QLoRA's double quantization)."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_quantize(self.quantize, self.blocksize)
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the layers to adapt or 'all-linear'")


def check_quantize(quantize: str | None, blocksize: int) -> None:
    """Raises ValueError unless the NF4 options of a config are valid."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES}, got {blocksize}")
