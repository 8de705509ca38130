"""Puts bottleneck adapters after the attention and MLP sub-blocks of a transformer, in place."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.nn.bottleneck import BottleneckBlock, BottleneckSettings
from lorakit.peft.bottleneck_config import BottleneckConfig
from lorakit.peft.inject import AdapterReport, put_adapter, train_only

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


def check_can_wrap(model: nn.Module, target: str, name: str) -> None:
    """Raises ValueError unless sub-block ``target`` can take a bottleneck adapter ``name``: a
    plain float sub-block, or a :class:`BottleneckBlock` without an adapter of that name."""
    module = model.get_submodule(target)
    if isinstance(module, BottleneckBlock):
        if name in module.settings:
            raise ValueError(f"{target} already has a bottleneck adapter named {name!r}")
        module = module.base
    param = next(module.parameters(), None)
    if param is None or param.dtype not in _FLOATS:
        found = None if param is None else param.dtype
        raise ValueError(f"{target}: bottleneck adapters need float weights, got {found}")


def add_bottleneck(
    model: nn.Module, target: str, name: str, settings: BottleneckSettings
) -> BottleneckBlock:
    """Gives sub-block ``target`` adapter ``name`` (checked by :func:`check_can_wrap` first):
    beside the others of a :class:`BottleneckBlock`, or in a new one that replaces it."""
    block = put_adapter(model, target, BottleneckBlock, name, settings, make_base=lambda m: m)
    assert isinstance(block, BottleneckBlock)
    return block


def apply_bottleneck(
    model: nn.Module, config: BottleneckConfig, name: str = "default"
) -> AdapterReport:
    """Adds a bottleneck adapter called ``name`` after the sub-blocks that ``config.placement``
    picks, in place.

    Each adapter is ``h + up(act(down(h)))`` on the sub-block's output ``h`` (see
    :class:`lorakit.nn.BottleneckAdapter`), width ``config.width(hidden_size)``, on the
    sub-block's device and dtype; ``up`` starts at zero, so the model computes what it did
    before. A sub-block that already has bottleneck adapters gets one more beside them. Afterwards
    ``name`` is the active adapter and the only thing that trains.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2, or another whose decoder
            layers have ``self_attn`` / ``attn`` and ``mlp`` children).
        config: where and how large.
        name: the adapter's name (see :func:`lorakit.set_adapter`, :func:`lorakit.save_adapter`).

    Returns:
        The adapted sub-blocks and the trainable / total parameter counts.

    Raises:
        ValueError: the model is not a supported transformer, a sub-block already has an adapter
            called ``name``, or has non-float weights. The model is then left as it was.
    """
    targets = sub_blocks(model, config.placement)
    hidden = hidden_size(model)
    for target in targets:  # every check before any change
        check_can_wrap(model, target, name)
    settings = BottleneckSettings(hidden, config.width(hidden), config.nonlinearity)
    for target in targets:
        add_bottleneck(model, target, name, settings)
    return train_only(model, name, targets)
