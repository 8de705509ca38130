"""Puts LoRA adapters into any torch model, in place."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.nn import LoRALinear, NF4Linear
from lorakit.peft.config import ALL_LINEAR, LoraConfig

try:  # GPT-2-style models store linear weights transposed in transformers' Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core usable
    Conv1D = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class LoraReport:
    """What :func:`apply_lora` did.

    Attributes:
        replaced: full names of the layers that got an adapter.
        trainable: parameters that train (the adapters).
        total: all parameters, NF4 weights counted by their number of weights.
    """

    replaced: tuple[str, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {share:.4f} ({len(self.replaced)} layers adapted)"
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | NF4Linear) or (
        Conv1D is not None and isinstance(module, Conv1D)
    )


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    linears = {name for name, m in model.named_modules() if _is_linear(m)}
    if config.target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return sorted(n for n in linears if model.get_submodule(n) is not output)
    matched = [n for n, _ in model.named_modules() if n and _matches(n, config.target_modules)]
    if not matched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target_modules {config.target_modules!r} match no module of "
            f"{type(model).__name__}; its linear layers are named {leaf_names}"
        )
    adapted = {n for n in matched if isinstance(model.get_submodule(n), LoRALinear)}
    wrong = [n for n in matched if n not in linears and n not in adapted]
    if wrong:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in wrong})
        raise ValueError(
            f"target_modules match {wrong[:5]} which are {kinds}, not linear layers; "
            "LoRA applies to nn.Linear, NF4Linear and transformers' Conv1D"
        )
    return matched


def _as_linear(module: nn.Module) -> nn.Linear | NF4Linear:
    if isinstance(module, nn.Linear | NF4Linear):
        return module
    # Conv1D computes x W + b with W (in, out): the same layer as nn.Linear with Wᵀ.
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
    linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _check_dtype(name: str, base: nn.Linear | NF4Linear, config: LoraConfig) -> None:
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: LoRA needs a float32, float16 or bfloat16 weight, got {dtype}")
    bias = base.bias
    if bias is not None and bias.dtype != dtype:
        raise ValueError(
            f"{name}: weight is {dtype} but bias is {bias.dtype}; cast the model to one dtype"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; an NF4 weight counts as its number of weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(math.prod(m.weight.shape) for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def apply_lora(model: nn.Module, config: LoraConfig) -> LoraReport:
    """Replaces the targeted linear layers of ``model`` by :class:`LoRALinear`, in place.

    With ``config.quantize == "nf4"`` each adapted layer's frozen weight is quantized to NF4 on its
    device (QLoRA). Afterwards only the adapters train: every other parameter is frozen.

    Args:
        model: any ``nn.Module`` (Hugging Face Llama, Qwen2, Mistral, GPT-2 included).
        config: which layers and how.

    Returns:
        The adapted layers and the trainable / total parameter counts.

    Raises:
        ValueError: nothing matches (the message lists the model's linear layer names), a match
            is not a linear layer or already has an adapter, a rank does not fit a layer, or
            a layer's dtypes cannot work together.
    """
    names = _targets(model, config)
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(model.get_submodule(name), LoRALinear) or isinstance(parent, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
    for name in names:
        base = _as_linear(model.get_submodule(name))
        _check_dtype(name, base, config)
        if config.quantize == "nf4" and isinstance(base, nn.Linear):
            base = NF4Linear.from_linear(base, config.blocksize, config.double_quant)
        try:
            layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    trainable, total = count_parameters(model)
    return LoraReport(replaced=tuple(names), trainable=trainable, total=total)
