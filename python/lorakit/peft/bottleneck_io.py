"""Bottleneck adapters on disk, in the spirit of PEFT's layout (PEFT has no bottleneck adapters).

``adapter_config.json``: ``"peft_type": "LORAKIT_BOTTLENECK"``, ``task_type``,
``base_model_name_or_path``, ``inference_mode``, and the adapter's fields: ``placement``
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

from lorakit.nn.bottleneck import NONLINEARITIES, BottleneckAdapter
from lorakit.peft.bottleneck import (
    ATTENTION_NAMES,
    bottleneck_layers,
    check_can_wrap,
    hidden_size,
    sub_blocks,
    wrap,
)
from lorakit.peft.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from lorakit.peft.lora_io import PREFIX

PEFT_TYPE = "LORAKIT_BOTTLENECK"
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
_KEY = re.compile(
    rf"{re.escape(PREFIX)}(?P<module>.+)\.bottleneck\.(?P<part>(down|up)\.(weight|bias))"
)


def save_bottleneck(model: nn.Module, out_dir: str | Path, name: str | None = None) -> Path:
    """Writes the model's bottleneck adapter in the format of the module docstring.

    Each file is written under a temporary name and renamed into place.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: the model has no bottleneck adapter, or none called ``name``.
    """
    layers = bottleneck_layers(model)
    if not layers:
        raise ValueError("the model has no bottleneck adapter")
    names = {block.adapter_name for _, block in layers}
    if name is not None and names != {name}:
        raise ValueError(f"no bottleneck adapter named {name!r}; the model has {sorted(names)}")
    (nonlinearity,) = {block.bottleneck.nonlinearity for _, block in layers}
    (size,) = {block.bottleneck.size for _, block in layers}  # one width: one hidden size
    kinds = {"attention" if n.rpartition(".")[2] in ATTENTION_NAMES else "mlp" for n, _ in layers}
    tensors = {
        f"{PREFIX}{module}.bottleneck.{part}": block.bottleneck.get_parameter(part)
        for module, block in layers
        for part in PARTS
    }
    model_config = getattr(model, "config", None)
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "inference_mode": True,
        "placement": "both" if len(kinds) == 2 else kinds.pop(),
        "size": size,
        "nonlinearity": nonlinearity,
        "hidden_size": hidden_size(model),
        "target_modules": [n for n, _ in layers],
    }
    out = Path(out_dir)
    write_tensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, config)
    return out


def load_bottleneck(
    model: nn.Module, in_dir: str | Path, name: str = "default", trainable: bool = False
) -> list[str]:
    """Loads a bottleneck adapter written by :func:`save_bottleneck` into ``model``.

    Every parameter outside the adapter is frozen. Everything is checked before the model is
    touched, so an error leaves it as it was.

    Args:
        model: the bare base model, without bottleneck adapters.
        in_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the name to give the adapter.
        trainable: let the adapter's parameters train.

    Returns:
        The names of the sub-blocks that got an adapter.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is corrupt, the config is not a bottleneck config, a key matches no
            attention or MLP sub-block of ``model``, a tensor's shape does not fit, or the
            model already has bottleneck adapters.
    """
    folder = Path(in_dir)
    config = read_json(folder / CONFIG_NAME)
    _check_config(config, folder / CONFIG_NAME)
    path = folder / WEIGHTS_NAME
    groups = _groups(read_tensors(path), path)
    if bottleneck_layers(model):
        raise ValueError("the model already has bottleneck adapters (lorakit keeps one set)")
    hidden, size = hidden_size(model), config["size"]
    allowed = set(sub_blocks(model))
    for module, parts in groups.items():  # every check before any change
        if module not in allowed:
            raise ValueError(f"{path}: {module!r} matches no attention or MLP sub-block")
        check_can_wrap(model, module)
        _check_shapes(module, parts, hidden, size, path)
    for module, parts in groups.items():
        param = check_can_wrap(model, module)
        adapter = BottleneckAdapter(hidden, size, config["nonlinearity"])
        adapter.load_state_dict(parts)
        wrap(model, module, adapter.to(device=param.device, dtype=param.dtype), name)
    model.requires_grad_(False)
    for _, block in bottleneck_layers(model):
        block.bottleneck.requires_grad_(trainable)
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
