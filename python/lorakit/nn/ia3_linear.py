"""(IA)³: learned vectors that rescale a frozen linear layer's output or input, several by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.nn.adapter_layer import AdapterLayer
from lorakit.nn.nf4_linear import NF4Linear


@dataclass(frozen=True)
class IA3Settings:
    """The hyperparameters of one adapter of an :class:`IA3Linear`."""

    feedforward: bool  # scale the layer's input (a feed-forward layer) instead of its output


class IA3Linear(AdapterLayer):
    """(IA)³ (Liu et al. 2022): ``y = l ⊙ base(x)``, or ``base(l ⊙ x)`` for a feed-forward layer.

    ``l`` starts at ones, so a new adapter leaves the output unchanged. As in PEFT, it is held as
    an ``(out, 1)`` column for an output scaling and a ``(1, in)`` row for an input scaling, so
    the tensors map one to one onto PEFT's ``ia3_l``. Keys and values are scaled on the output of
    their projections; the feed-forward activation is scaled on the input of the layer that
    reads it (``down_proj``), which is the same thing. The product is plain PyTorch: one
    elementwise multiply beside the base matmul, which autograd handles.

    Args:
        base: an ``nn.Linear`` or :class:`NF4Linear`; its parameters are frozen.
        feedforward: scale the input instead of the output.
        name: the first adapter's name; it becomes the active one.

    Raises:
        TypeError: ``base`` is neither an ``nn.Linear`` nor an ``NF4Linear``.
    """

    method = "IA3"

    def __init__(
        self, base: nn.Linear | NF4Linear, feedforward: bool, name: str = "default"
    ) -> None:
        super().__init__(name)
        if not isinstance(base, nn.Linear | NF4Linear):
            raise TypeError(f"IA3Linear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base = base
        self.ia3_l = nn.ParameterDict()
        self.settings: dict[str, IA3Settings] = {}
        self.add_adapter(name, IA3Settings(feedforward))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def vector_shape(self, settings: IA3Settings) -> tuple[int, int]:
        """PEFT's shape of ``ia3_l``: ``(1, in)`` for an input scaling, ``(out, 1)`` otherwise."""
        return (1, self.in_features) if settings.feedforward else (self.out_features, 1)

    def add_adapter(self, name: str, settings: IA3Settings) -> None:
        """Adds a fresh adapter (``l = 1``); the active one stays active.

        Raises:
            ValueError: the name is taken.
        """
        if name in self.settings:
            raise ValueError(f"this layer already has an IA3 adapter named {name!r}")
        weight = self.base.weight
        shape = self.vector_shape(settings)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=weight.dtype, device=weight.device))
        self.settings[name] = settings

    @classmethod
    def wrap(cls, base: nn.Module, name: str, settings: IA3Settings) -> IA3Linear:
        return cls(base, settings.feedforward, name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]] if name in self.settings else []

    def check_merge(self, name: str) -> None:
        if bool((self.ia3_l[name] == 0).any()):
            raise ValueError(f"IA3 adapter {name!r} has a zero scale, which unmerge could not undo")

    def _update_base(self, name: str, undo: bool) -> None:
        # The (out, 1) column scales W's rows (and the bias, which is part of the output); the
        # (1, in) row scales W's columns. Formed in float32, rounded once to the weight's dtype;
        # an NF4 weight is quantized again, which unmerge cannot undo exactly for a column scaling
        # (tests/test_ia3_nf4_merge.py measures it).
        scale = self.ia3_l[name].detach().to(torch.float32)
        if undo:
            scale = scale.reciprocal()
        if isinstance(self.base, NF4Linear):
            self.base.weight = self.base.weight.with_scaling(scale)
        else:
            weight = self.base.weight
            weight.copy_((weight.to(torch.float32) * scale).to(weight.dtype))
        bias = self.base.bias
        if bias is not None and not self.settings[name].feedforward:
            bias.copy_((bias.to(torch.float32) * scale.flatten()).to(bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_adapter():
            return self.base(x)
        scale = self.ia3_l[self.active_adapter].flatten()
        if self.settings[self.active_adapter].feedforward:
            return self.base(x * scale)
        return self.base(x) * scale

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: {'input' if s.feedforward else 'output'}" for n, s in self.settings.items()
        )
        return f"active={self.active_adapter!r}, {adapters}"
