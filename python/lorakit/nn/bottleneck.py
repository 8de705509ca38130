"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a
transformer sub-block, the sub-block itself frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lorakit.nn.adapter_layer import AdapterLayer

Nonlinearity = Literal["relu", "gelu", "silu", "tanh"]
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class BottleneckAdapter(nn.Module):
    """``y = h + up(act(down(h)))`` with ``down`` (hidden -> size) and ``up`` (size -> hidden).

    ``down`` starts as ``nn.Linear`` does (Kaiming-uniform) and ``up`` at zero (weight and bias),
    so a new adapter is the identity and the adapted model starts equal to its base, as a new
    LoRA adapter (B = 0) does.

    Args:
        hidden: width of the sub-block's output.
        size: bottleneck width.
        nonlinearity: one of :data:`NONLINEARITIES`.
    """

    def __init__(self, hidden: int, size: int, nonlinearity: str = "relu") -> None:
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}"
            )
        if size < 1 or hidden < 1:
            raise ValueError(f"hidden and size must be positive, got {hidden} and {size}")
        self.nonlinearity = nonlinearity
        self.down = nn.Linear(hidden, size)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def size(self) -> int:
        return self.down.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


@dataclass(frozen=True)
class BottleneckSettings:
    """The hyperparameters of one adapter of a :class:`BottleneckBlock`."""

    hidden: int  # width of the sub-block's output
    size: int  # bottleneck width
    nonlinearity: str = "relu"


class BottleneckBlock(AdapterLayer):
    """A frozen sub-block (``base``: attention or MLP) followed by a :class:`BottleneckAdapter`,
    several by name (``bottleneck[name]``), one active.

    The adapter applies to the sub-block's output before the layer's own residual addition, where
    Houlsby et al. put it. Hugging Face attention modules return a tuple ``(output, weights)``:
    only the first element passes through the adapter. With adapters disabled, or an active
    adapter this block lacks, it returns the sub-block's output unchanged. A bottleneck adapter
    is nonlinear, so it cannot be merged into the base weights (:meth:`merge` refuses).

    Args:
        base: the sub-block; its parameters are frozen. New adapters take the device and dtype
            of its first parameter.
        name: the first adapter's name; it becomes the active one.
        settings: its sizes and nonlinearity.
    """

    method = "bottleneck"

    def __init__(self, base: nn.Module, name: str, settings: BottleneckSettings) -> None:
        super().__init__(name)
        base.requires_grad_(False)
        self.base = base
        self.bottleneck = nn.ModuleDict()
        self.settings: dict[str, BottleneckSettings] = {}
        self.add_adapter(name, settings)

    @classmethod
    def wrap(cls, base: nn.Module, name: str, settings: BottleneckSettings) -> BottleneckBlock:
        return cls(base, name, settings)

    def add_adapter(self, name: str, settings: BottleneckSettings) -> None:
        """Adds a fresh adapter (the identity: ``up`` is zero); the active one stays active.

        Raises:
            ValueError: the name is taken, or the settings are invalid.
        """
        if name in self.settings:
            raise ValueError(f"this block already has a bottleneck adapter named {name!r}")
        reference = next(self.base.parameters())
        adapter = BottleneckAdapter(settings.hidden, settings.size, settings.nonlinearity)
        self.bottleneck[name] = adapter.to(device=reference.device, dtype=reference.dtype)
        self.settings[name] = settings

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.bottleneck[name].parameters()) if name in self.settings else []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if not self.uses_adapter():
            return out
        adapter = self.bottleneck[self.active_adapter]
        if isinstance(out, tuple):
            return (adapter(out[0]), *out[1:])
        return adapter(out)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: size {s.size}, {s.nonlinearity}" for n, s in self.settings.items()
        )
        return f"active={self.active_adapter!r}, {adapters}"
