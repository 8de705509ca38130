"""Prefix tuning: configuration, and attaching a learned prefix to a Hugging Face causal LM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lorakit.nn.prefix import KVPrefix, PrefixSettings, PrefixShape
from lorakit.peft.files import is_causal_lm
from lorakit.peft.inject import AdapterReport, train_only

# Where the prefix lives on the model (its state dict keys are lorakit_prefix.embedding.<name>).
PREFIX_ATTRIBUTE = "lorakit_prefix"
# model_type values whose attention reads a DynamicCache of [batch, kv_heads, tokens, head_dim]
# keys and values per layer, so that a prefix passed as the cache reaches every layer;
# tests/test_prefix_tuning.py checks each against PEFT's prefix tuning.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


@dataclass
class PrefixTuningConfig:
    """How long the learned prefix is and how it starts."""

    num_virtual_tokens: int = field(
        default=20,
        metadata={"help": "Learned key/value positions that every attention layer sees first."},
    )
    init: Literal["normal", "zero"] = field(
        default="normal",
        metadata={
            "help": "Start the prefix N(0, 1) (PEFT's default, nn.Embedding's init) or at zeros "
            "(PEFT's init_weights='zero')."
        },
    )

    def __post_init__(self) -> None:
        tokens = self.num_virtual_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {tokens!r}")
        if self.init not in ("normal", "zero"):
            raise ValueError(f"init must be 'normal' or 'zero', got {self.init!r}")


PrefixConfig = PrefixTuningConfig


def prefix_shape(model: nn.Module) -> PrefixShape:
    """The layers, KV heads and head size a prefix for ``model`` has (as PEFT computes them).

    Raises:
        ValueError: ``model`` is not a Hugging Face causal LM of a supported architecture.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not is_causal_lm(model):
        raise ValueError(
            f"prefix tuning supports Hugging Face causal LMs of model_type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} "
            f"(model_type {model_type!r})"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return PrefixShape(config.num_hidden_layers, kv_heads, head_dim)


def model_prefix(model: nn.Module) -> KVPrefix | None:
    """The model's :class:`KVPrefix`, if it has one."""
    prefix = getattr(model, PREFIX_ATTRIBUTE, None)
    return prefix if isinstance(prefix, KVPrefix) else None


def check_can_attach(model: nn.Module, name: str) -> PrefixShape:
    """The prefix shape for ``model``; raises ValueError if prefix ``name`` cannot be added."""
    shape = prefix_shape(model)
    prefix = model_prefix(model)
    if prefix is not None and name in prefix.settings:
        raise ValueError(f"the model already has a prefix named {name!r}")
    if prefix is None and hasattr(model, PREFIX_ATTRIBUTE):
        raise ValueError(f"the model already has an attribute {PREFIX_ATTRIBUTE!r}")
    return shape


def attach_prefix(model: nn.Module, name: str, settings: PrefixSettings) -> KVPrefix:
    """Adds prefix ``name`` to ``model`` (checked by :func:`check_can_attach` first)."""
    prefix = model_prefix(model)
    if prefix is not None:
        prefix.add_adapter(name, settings)
        return prefix
    reference = next(model.parameters())
    prefix = KVPrefix(prefix_shape(model), name, settings, reference.dtype, reference.device)
    model.add_module(PREFIX_ATTRIBUTE, prefix)
    # Bound methods of the prefix: deepcopy(model) then hooks the copy's own prefix.
    model.register_forward_pre_hook(prefix.inject, with_kwargs=True)
    # always_call: it also undoes what the pre-hook changed for a call that then raised.
    model.register_forward_hook(prefix.drop_unrequested_cache, always_call=True)
    return prefix


def apply_prefix_tuning(
    model: nn.Module, config: PrefixTuningConfig, name: str = "default"
) -> AdapterReport:
    """Gives a Hugging Face causal LM a learned prefix called ``name``, in place.

    Every attention layer then attends to ``config.num_virtual_tokens`` learned keys and values
    before the input (see :class:`~lorakit.nn.prefix.KVPrefix`); ``model(input_ids=...,
    attention_mask=..., labels=...)`` works as before and its logits keep the input's length.
    Afterwards ``name`` is the active adapter and the only thing that trains.

    Supported: causal LMs of ``model_type`` gpt2, llama, mistral, qwen2, qwen3; full forward
    passes, ``generate()`` (with its default cache) and incremental decoding with the cache the
    model returns; training with gradient checkpointing.

    Returns:
        The module holding the prefix, and the trainable / total parameter counts.

    Raises:
        ValueError: unsupported model, or the name is taken; the model is then left as it was.
    """
    check_can_attach(model, name)
    attach_prefix(model, name, PrefixSettings(config.num_virtual_tokens, config.init))
    return train_only(model, name, [PREFIX_ATTRIBUTE])
