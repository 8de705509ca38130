"""Configuration of bottleneck adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.nn.bottleneck import NONLINEARITIES, Nonlinearity
from lorakit.validate import check_number

Placement = Literal["both", "attention", "mlp"]
PLACEMENTS = ("both", "attention", "mlp")


@dataclass
class BottleneckConfig:
    """Where bottleneck adapters go in each transformer layer, and their size."""

    placement: Placement = field(
        default="both",
        metadata={
            "help": "After which sub-blocks of each layer: both (Houlsby et al. 2019), "
            "attention, or mlp (Pfeiffer et al. 2020)."
        },
    )
    reduction_factor: int = field(
        default=16,
        metadata={"help": "Bottleneck width = hidden size // reduction_factor (at least 1)."},
    )
    size: int | None = field(
        default=None,
        metadata={"help": "Bottleneck width; when set it overrides reduction_factor."},
    )
    nonlinearity: Nonlinearity = field(
        default="relu", metadata={"help": "Activation between the down and up projections."}
    )

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_number("reduction_factor", self.reduction_factor, integer=True, low=1)
        if self.size is not None:
            check_number("size", self.size, integer=True, low=1)
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {self.nonlinearity!r}"
            )

    def width(self, hidden: int) -> int:
        """The bottleneck width for a model of hidden size ``hidden``."""
        return self.size if self.size is not None else max(1, hidden // self.reduction_factor)
