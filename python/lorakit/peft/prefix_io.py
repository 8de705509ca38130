"""Prefixes in PEFT's prefix-tuning file format (``peft_type`` PREFIX_TUNING, ``CAUSAL_LM``).

PEFT 0.21.2 saves one tensor, ``prompt_embeddings``, of shape ``[num_virtual_tokens, num_layers
* 2 * token_dim]`` with ``token_dim = kv_heads * head_dim`` and ``num_attention_heads = kv_heads``
(its grouped-query rule), and writes ``inference_mode: true``, so that loading reads the tensor
as the prefix itself. With ``prefix_projection`` PEFT saves the projected prefix, which is the
same tensor; lorakit loads it as a plain prefix (training it then trains the prefix, not the MLP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.nn.prefix import PrefixSettings
from lorakit.peft.adapters import active_adapter, finish_load
from lorakit.peft.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    peft_header,
    read_tensors,
    write_json,
    write_tensors,
)
from lorakit.peft.prefix import PREFIX_ATTRIBUTE, attach_prefix, check_can_attach, model_prefix

KEY = "prompt_embeddings"


def save_prefix(model: nn.Module, out: Path, name: str) -> None:
    """Writes prefix ``name`` in PEFT's format (see :func:`lorakit.save_adapter`)."""
    prefix = model_prefix(model)
    assert prefix is not None and name in prefix.settings  # adapter_io picked this method
    s = prefix.shape
    token_dim = s.num_kv_heads * s.head_dim
    config = {
        **peft_header(model, "PREFIX_TUNING"),
        "num_virtual_tokens": prefix.settings[name].num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": s.num_kv_heads,
        "num_layers": s.num_layers,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
    }
    write_tensors(out / WEIGHTS_NAME, {KEY: prefix.embedding[name]})
    write_json(out / CONFIG_NAME, config)


def load_prefix(
    model: nn.Module, folder: Path, config: dict[str, Any], name: str, trainable: bool
) -> list[str]:
    """Loads the prefix in ``folder`` (config already read) as ``name``; see
    :func:`lorakit.load_adapter`. Everything is checked before the model is touched.

    Raises:
        ValueError: unsupported model or options, the files are for another model geometry, a
            tensor's shape is wrong, or the model already has a prefix called ``name``.
    """
    path = folder / CONFIG_NAME
    shape = check_can_attach(model, name)
    if config.get("task_type") != "CAUSAL_LM":
        raise ValueError(f"{path}: task_type {config.get('task_type')!r} is not 'CAUSAL_LM'")
    for key, plain in (("num_transformer_submodules", 1), ("modules_to_save", None)):
        if config.get(key, plain) not in (plain, None, []):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by lorakit")
    expected = {
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_kv_heads,
        "token_dim": shape.num_kv_heads * shape.head_dim,
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(
                f"{path}: {key}={config.get(key)!r} does not fit {type(model).__name__}, whose "
                f"prefix has {key}={value}"
            )
    tokens = config.get("num_virtual_tokens")
    tensors = read_tensors(folder / WEIGHTS_NAME)
    if set(tensors) != {KEY}:
        raise ValueError(
            f"{folder / WEIGHTS_NAME}: expected one tensor {KEY!r}, got {sorted(tensors)}"
        )
    weight = tensors[KEY]
    if not isinstance(tokens, int) or tuple(weight.shape) != (tokens, shape.width):
        raise ValueError(
            f"{folder / WEIGHTS_NAME}: {KEY} {list(weight.shape)} does not fit "
            f"num_virtual_tokens={tokens!r} x {shape.width} (layers * 2 * kv_heads * head_dim)"
        )
    previous = active_adapter(model)
    prefix = attach_prefix(model, name, PrefixSettings(tokens, init="zero"))
    with torch.no_grad():
        prefix.embedding[name].copy_(weight)
    finish_load(model, name, [prefix], trainable, previous)
    return [PREFIX_ATTRIBUTE]
