"""Bottleneck adapters on disk, in the spirit of PEFT's layout (PEFT has no bottleneck adapters).

``adapter_config.json``: PEFT's header (:func:`lorakit.peft.files.peft_header`: ``"peft_type":
"LORAKIT_BOTTLENECK"``, ``task_type``, ``base_model_name_or_path``, ``revision``,
``inference_mode``) and the adapter's fields: ``placement``
(both / attention / mlp), ``size`` (the bottleneck width), ``nonlinearity``, ``hidden_size``,
``target_modules`` (full names of the adapted sub-blocks).

``adapter_model.safetensors``: for each adapted sub-block ``<module>`` (its name in the bare
model, e.g. ``model.layers.0.self_attn``), four tensors named as PEFT names LoRA's:
``base_model.model.<module>.bottleneck.down.weight`` (size, hidden), ``...down.bias`` (size),
``...up.weight`` (hidden, size), ``...up.bias`` (hidden).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.nn.bottleneck import NONLINEARITIES, BottleneckSettings
from lorakit.peft.adapters import active_adapter, finish_load
from lorakit.peft.bottleneck import (
    ATTENTION_NAMES,
    add_bottleneck,
    bottleneck_layers,
    check_can_wrap,
    hidden_size,
    sub_blocks,
)
from lorakit.peft.files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    peft_header,
    read_tensors,
    write_json,
    write_tensors,
)
from lorakit.peft.target_check import check_targets_match

PEFT_TYPE = "LORAKIT_BOTTLENECK"
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
_KEY = re.compile(
    rf"{re.escape(PREFIX)}(?P<module>.+)\.bottleneck\.(?P<part>(down|up)\.(weight|bias))"
)


def save_bottleneck(model: nn.Module, out: Path, name: str) -> None:
    """Writes bottleneck adapter ``name`` in the format of the module docstring (see
    :func:`lorakit.save_adapter`, which picks this writer)."""
    layers = [(n, block) for n, block in bottleneck_layers(model) if name in block.settings]
    # apply_bottleneck gives every sub-block of an adapter the same settings
    (settings,) = {block.settings[name] for _, block in layers}
    kinds = {"attention" if n.rpartition(".")[2] in ATTENTION_NAMES else "mlp" for n, _ in layers}
    tensors = {
        f"{PREFIX}{module}.bottleneck.{part}": block.bottleneck[name].get_parameter(part)
        for module, block in layers
        for part in PARTS
    }
    config: dict[str, Any] = {
        **peft_header(model, PEFT_TYPE),
        "placement": "both" if len(kinds) == 2 else kinds.pop(),
        "size": settings.size,
        "nonlinearity": settings.nonlinearity,
        "hidden_size": settings.hidden,
        "target_modules": [n for n, _ in layers],
    }
    write_tensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, config)


def load_bottleneck(
    model: nn.Module, folder: Path, config: dict[str, Any], name: str, trainable: bool
) -> list[str]:
    """Loads the bottleneck adapter in ``folder`` (config already read) as ``name``; see
    :func:`lorakit.load_adapter`, which picks this reader. Sub-blocks without a bottleneck
    adapter yet are wrapped in a :class:`~lorakit.nn.BottleneckBlock`; the others get one more
    adapter. Everything is checked before the model is touched.

    Returns:
        The names of the sub-blocks that got the adapter.

    Raises:
        ValueError: the config is not a bottleneck config, a key matches no attention or MLP
            sub-block of ``model``, a tensor's shape does not fit, a sub-block already has an
            adapter called ``name``, or ``target_modules`` name other sub-blocks than the file
            holds weights for.
    """
    _check_config(config, folder / CONFIG_NAME)
    path = folder / WEIGHTS_NAME
    groups = _groups(read_tensors(path), path)
    hidden = hidden_size(model)
    settings = BottleneckSettings(hidden, config["size"], config["nonlinearity"])
    allowed = set(sub_blocks(model))
    for module, parts in groups.items():  # every check before any change
        if module not in allowed:
            raise ValueError(f"{path}: {module!r} matches no attention or MLP sub-block")
        check_can_wrap(model, module, name)
        _check_shapes(module, parts, hidden, settings.size, path)
    check_targets_match(model, folder, config, groups, allowed)
    previous = active_adapter(model)
    loaded = []
    for module, parts in groups.items():
        block = add_bottleneck(model, module, name, settings)
        with torch.no_grad():
            for part, tensor in parts.items():
                block.bottleneck[name].get_parameter(part).copy_(tensor)
        loaded.append(block)
    finish_load(model, name, loaded, trainable, previous)
    return sorted(groups)


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not {PEFT_TYPE!r}")
    if config.get("nonlinearity") not in NONLINEARITIES:
        raise ValueError(f"{path}: nonlinearity {config.get('nonlinearity')!r} is not supported")
    size = config.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{path}: size must be a positive integer, got {size!r}")


def _groups(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{path}: key {key!r} is not a bottleneck weight "
                f"({PREFIX}<module>.bottleneck.<down|up>.<weight|bias>)"
            )
        groups.setdefault(match["module"], {})[match["part"]] = tensor
    if not groups:
        raise ValueError(f"{path} holds no bottleneck weights")
    for module, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"{path}: {module} lacks {missing}")
    return groups


def _check_shapes(
    module: str, parts: dict[str, torch.Tensor], hidden: int, size: int, path: Path
) -> None:
    expected = {
        "down.weight": (size, hidden),
        "down.bias": (size,),
        "up.weight": (hidden, size),
        "up.bias": (hidden,),
    }
    for part, shape in expected.items():
        if tuple(parts[part].shape) != shape:
            raise ValueError(
                f"{path}: {module}.bottleneck.{part} has shape {list(parts[part].shape)}, "
                f"expected {list(shape)} (hidden size {hidden}, bottleneck size {size})"
            )
