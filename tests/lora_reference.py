"""The LoRA linear in plain PyTorch: the composition the native ops must agree with."""

from __future__ import annotations

import torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    low_rank_input = x if x_lora is None else x_lora
    y = x @ weight.t() + scale * (low_rank_input @ lora_a.t()) @ lora_b.t()
    return y if bias is None else y + bias
