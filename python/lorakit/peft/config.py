"""Configuration of LoRA / QLoRA injection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.ops import NF4_BLOCKSIZES
from lorakit.validate import check_number

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
        check_number("r", self.r, integer=True, low=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_quantize(self.quantize, self.blocksize)
        self.target_modules = normalize_targets(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the layers to adapt or 'all-linear'")


def normalize_targets(targets: list[str] | str | None) -> list[str] | str | None:
    """Module names as a list (a tuple or set taken as one), a single pattern string kept as it
    is, and ``["all-linear"]`` (what ``--lora-target-modules all-linear`` gives) as
    ``"all-linear"``.

    Raises:
        ValueError: not a string or a collection of strings, or ``all-linear`` is listed beside
            module names.
    """
    if targets is None or isinstance(targets, str):
        return targets
    if not isinstance(targets, list | tuple | set) or not all(isinstance(t, str) for t in targets):
        raise ValueError(
            f"target_modules must be a module name pattern or a list of module names, got "
            f"{targets!r}"
        )
    targets = sorted(targets) if isinstance(targets, set) else list(targets)
    if ALL_LINEAR not in targets:
        return targets
    if len(targets) > 1:
        raise ValueError(f"target_modules {targets}: {ALL_LINEAR!r} takes no other names")
    return ALL_LINEAR


def check_quantize(quantize: str | None, blocksize: int) -> None:
    """Raises ValueError unless the NF4 options of a config are valid."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES}, got {blocksize}")
