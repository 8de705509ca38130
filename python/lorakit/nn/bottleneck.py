"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a
transformer sub-block, the sub-block itself frozen."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

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


class BottleneckBlock(nn.Module):
    """A frozen sub-block (``base``: attention or MLP) followed by a :class:`BottleneckAdapter`.

    The adapter applies to the sub-block's output before the layer's own residual addition, where
    Houlsby et al. put it. Hugging Face attention modules return a tuple ``(output, weights)``:
    only the first element passes through the adapter.

    Args:
        base: the sub-block; its parameters are frozen.
        adapter: the adapter (its device and dtype should match ``base``'s).
        name: the adapter's name, kept for saving.
    """

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter, name: str = "default") -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.bottleneck = adapter
        self.adapter_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.bottleneck(out[0]), *out[1:])
        return self.bottleneck(out)
