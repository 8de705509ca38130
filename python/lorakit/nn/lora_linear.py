"""LoRA: a trainable low-rank update beside a frozen linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit import ops
from lorakit.nn.nf4_linear import NF4Linear, nf4_lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + s · B A dropout(x)`` with ``base`` frozen (Hu et al. 2021, QLoRA 2023).

    ``A`` (r, in) starts Kaiming-uniform, as PEFT initialises it, and ``B`` (out, r) at zero, so a
    new adapter leaves the output unchanged. ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023). Dropout applies to the low-rank path's input only, as in PEFT. Forward
    and backward run as one native op (the low-rank term accumulates into the base product's
    output); the base weight gets no gradient.

    Args:
        base: an ``nn.Linear`` or :class:`NF4Linear`; its parameters are frozen.
        r: rank, 1 to ``min(in_features, out_features)``.
        alpha: scaling numerator.
        dropout: probability of zeroing an input of the low-rank path while training.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Raises:
        TypeError: ``base`` is neither an ``nn.Linear`` nor an ``NF4Linear``.
        ValueError: ``r`` or ``dropout`` out of range.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | NF4Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        largest = min(base.in_features, base.out_features)
        if not isinstance(r, int) or not 1 <= r <= largest:
            raise ValueError(
                f"LoRA rank r must be an integer from 1 to min(in, out) = {largest} for a "
                f"{base.in_features} -> {base.out_features} layer, got {r!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        base.requires_grad_(False)
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        options = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **options))
        # nn.Linear's default init (Kaiming-uniform with a = sqrt(5)), which PEFT uses for A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = self.dropout(x) if self.dropout is not None and self.training else None
        adapter = (self.lora_A, self.lora_B, self.scaling, x_lora)
        if isinstance(self.base, NF4Linear):
            return nf4_lora_linear(x, self.base.weight, self.base.bias, *adapter)
        return ops.lora_linear(x, self.base.weight, self.base.bias, *adapter)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
