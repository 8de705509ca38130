"""Puts bottleneck adapters after the attention and MLP sub-blocks of a transformer, in place."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.nn.bottleneck import BottleneckAdapter, BottleneckBlock
from lorakit.peft.bottleneck_config import BottleneckConfig
from lorakit.peft.inject import LoraReport, count_parameters, replace_module

# Child names of a decoder layer's sub-blocks: Llama, Qwen2, Mistral call the attention
# ``self_attn``, GPT-2 ``attn``; all of them call the feed-forward block ``mlp``.
ATTENTION_NAMES = ("self_attn", "attn")
MLP_NAME = "mlp"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def bottleneck_layers(model: nn.Module) -> list[tuple[str, BottleneckBlock]]:
    """The model's :class:`BottleneckBlock` sub-blocks with their full names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckBlock)]


def sub_blocks(model: nn.Module, placement: str = "both") -> list[str]:
    """Full names of the attention and / or MLP sub-blocks of every decoder layer of ``model``.

    A decoder layer is a module with an ``mlp`` child and a ``self_attn`` or ``attn`` child.

    Raises:
        ValueError: ``model`` has no such layer (not a supported transformer).
    """
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        attention = next((c for c in ATTENTION_NAMES if c in children), None)
        if attention is None or MLP_NAME not in children:
            continue
        prefix = f"{name}." if name else ""
        if placement in ("both", "attention"):
            found.append(prefix + attention)
        if placement in ("both", "mlp"):
            found.append(prefix + MLP_NAME)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no decoder layer with an 'mlp' and a 'self_attn' or "
            "'attn' child; bottleneck adapters support Hugging Face causal LMs such as Llama, "
            "Qwen2, Mistral and GPT-2"
        )
    return found


def hidden_size(model: nn.Module) -> int:
    """The model's hidden size, from its Hugging Face config (GPT-2's ``n_embd`` included)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(
            f"{type(model).__name__} has no config.hidden_size; bottleneck adapters need a "
            "Hugging Face model"
        )
    return hidden


def check_can_wrap(model: nn.Module, target: str) -> torch.nn.Parameter:
    """Raises ValueError unless ``target`` is a plain float sub-block; returns a parameter of it
    (its device and dtype are the adapter's)."""
    module = model.get_submodule(target)
    if isinstance(module, BottleneckBlock):
        raise ValueError(f"{target} already has a bottleneck adapter (one per sub-block)")
    param = next(module.parameters(), None)
    if param is None or param.dtype not in _FLOATS:
        found = None if param is None else param.dtype
        raise ValueError(f"{target}: bottleneck adapters need float weights, got {found}")
    return param


def wrap(model: nn.Module, target: str, adapter: BottleneckAdapter, name: str) -> BottleneckBlock:
    """Replaces sub-block ``target`` by a :class:`BottleneckBlock` of it and ``adapter``."""
    block = BottleneckBlock(model.get_submodule(target), adapter, name)
    replace_module(model, target, block)
    return block


def apply_bottleneck(
    model: nn.Module, config: BottleneckConfig, name: str = "default"
) -> LoraReport:
    """Adds a bottleneck adapter after the sub-blocks that ``config.placement`` picks, in place.

    Each adapter is ``h + up(act(down(h)))`` on the sub-block's output ``h`` (see
    :class:`lorakit.nn.BottleneckAdapter`), width ``config.width(hidden_size)``, on the
    sub-block's device and dtype; ``up`` starts at zero, so the model computes what it did
    before. Afterwards the adapters are the only thing that trains.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2, or another whose decoder
            layers have ``self_attn`` / ``attn`` and ``mlp`` children).
        config: where and how large.
        name: the adapter's name (written by :func:`lorakit.save_adapter`).

    Returns:
        The adapted sub-blocks and the trainable / total parameter counts.

    Raises:
        ValueError: the model is not a supported transformer, already has bottleneck adapters, or
            has non-float weights. The model is then left as it was.
    """
    targets = sub_blocks(model, config.placement)
    if bottleneck_layers(model):
        raise ValueError("the model already has bottleneck adapters (lorakit keeps one set)")
    hidden = hidden_size(model)
    params = {t: check_can_wrap(model, t) for t in targets}  # every check before any change
    for target, param in params.items():
        adapter = BottleneckAdapter(hidden, config.width(hidden), config.nonlinearity)
        wrap(model, target, adapter.to(device=param.device, dtype=param.dtype), name)
    model.requires_grad_(False)
    for _, block in bottleneck_layers(model):
        block.bottleneck.requires_grad_(True)
    trainable, total = count_parameters(model)
    return LoraReport(replaced=tuple(targets), trainable=trainable, total=total)
