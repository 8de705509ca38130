"""IA3 adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a vector ``base_model.model.<module>.ia3_l``, shaped ``(out, 1)`` for an output scaling
and ``(1, in)`` for a feed-forward (input) scaling; the config's ``feedforward_modules`` says
which layers are which, matched as in :func:`lorakit.peft.ia3.is_feedforward`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.nn import IA3Linear, NF4Linear
from lorakit.nn.ia3_linear import IA3Settings
from lorakit.peft.adapters import active_adapter, adapter_layers, finish_load
from lorakit.peft.files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    peft_header,
    read_tensors,
    write_json,
    write_tensors,
)
from lorakit.peft.ia3 import is_feedforward
from lorakit.peft.inject import (
    adaptable_layers,
    check_dtype,
    linear_features,
    put_adapter,
    target_names,
)
from lorakit.peft.target_check import check_targets_match

_KEY = re.compile(rf"{re.escape(PREFIX)}(?P<module>.+)\.ia3_l")
# PEFT options that change what the files mean; lorakit refuses them rather than misread them.
_UNSUPPORTED: dict[str, Any] = {"modules_to_save": None}


def ia3_layers(model: nn.Module, name: str) -> dict[str, IA3Linear]:
    """The model's IA3 layers that hold adapter ``name``, by full name."""
    return {
        n: layer
        for n, layer in adapter_layers(model)
        if isinstance(layer, IA3Linear) and name in layer.settings
    }


def save_ia3(model: nn.Module, out: Path, name: str) -> None:
    """Writes IA3 adapter ``name`` in the PEFT format (see :func:`lorakit.save_adapter`)."""
    layers = ia3_layers(model, name)
    tensors = {f"{PREFIX}{module}.ia3_l": layer.ia3_l[name] for module, layer in layers.items()}
    feedforward = {m for m, layer in layers.items() if layer.settings[name].feedforward}
    targets, feedforward_names = _names(model, set(layers), feedforward)
    config = {
        **peft_header(model, "IA3"),
        "target_modules": targets,
        "feedforward_modules": feedforward_names,
        "exclude_modules": None,
        "fan_in_fan_out": False,  # PEFT sets it itself for Conv1D; the vectors do not depend on it
        "init_ia3_weights": True,
        **_UNSUPPORTED,
    }
    write_tensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, config)


def _names(
    model: nn.Module, modules: set[str], feedforward: set[str]
) -> tuple[list[str], list[str]]:
    # PEFT wants feedforward_modules to be a subset of target_modules (as strings): take the
    # target entries that name feed-forward layers, if PEFT's suffix rule then picks exactly those
    # layers among the targets; else full names for both (GPT-2: "c_proj" would also pick the
    # attention's c_proj).
    targets = target_names(model, modules)
    names = [t for t in targets if any(m == t or m.endswith(f".{t}") for m in feedforward)]
    if {m for m in modules if is_feedforward(m, names)} == feedforward:
        return targets, names
    return sorted(modules), sorted(feedforward)


def load_ia3(
    model: nn.Module, folder: Path, config: dict[str, Any], name: str, trainable: bool
) -> list[str]:
    """Loads the IA3 adapter in ``folder`` (config already read) as ``name``; see
    :func:`lorakit.load_adapter`. Everything is checked before the model is touched.

    Raises:
        ValueError: the config is not an IA3 config lorakit supports, a key matches no linear
            layer of ``model``, a layer already has adapter ``name``, a vector's shape does
            not fit its layer, or ``target_modules`` pick other layers than the file holds
            vectors for (:func:`~lorakit.peft.target_check.check_targets_match`).
    """
    path = folder / CONFIG_NAME
    feedforward = config.get("feedforward_modules")
    if not isinstance(feedforward, list | str):
        raise ValueError(f"{path}: feedforward_modules must be a list or a regular expression")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, [], {}):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by lorakit")
    tensors = read_tensors(folder / WEIGHTS_NAME)
    if not tensors:
        raise ValueError(f"{folder / WEIGHTS_NAME} holds no IA3 vectors")
    adaptable = adaptable_layers(model, IA3Linear)
    plan = {}
    for key, vector in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{folder / WEIGHTS_NAME}: key {key!r} is not an IA3 vector")
        module = match["module"]
        plan[module] = _plan(model, adaptable, module, vector, feedforward, name)
    check_targets_match(model, folder, config, plan, adaptable)
    previous = active_adapter(model)
    loaded = []
    for module, (settings, vector) in plan.items():
        layer = put_adapter(model, module, IA3Linear, name, settings)
        with torch.no_grad():
            layer.ia3_l[name].copy_(vector)
        loaded.append(layer)
    finish_load(model, name, loaded, trainable, previous)
    return sorted(plan)


def _plan(
    model: nn.Module,
    adaptable: set[str],
    module: str,
    vector: torch.Tensor,
    feedforward: list[str] | str,
    name: str,
) -> tuple[IA3Settings, torch.Tensor]:
    if module not in adaptable:
        raise ValueError(f"adapter weights for {module!r} match no linear layer of the model")
    layer = model.get_submodule(module)
    if isinstance(layer, IA3Linear) and name in layer.settings:
        raise ValueError(f"{module} already has an IA3 adapter named {name!r}")
    if not isinstance(layer, IA3Linear | NF4Linear):
        check_dtype(module, layer)
    in_features, out_features = linear_features(layer)
    settings = IA3Settings(feedforward=is_feedforward(module, feedforward))
    expected = (1, in_features) if settings.feedforward else (out_features, 1)
    if tuple(vector.shape) != expected:
        kind = "a feed-forward (input)" if settings.feedforward else "an output"
        raise ValueError(
            f"{module}: ia3_l {list(vector.shape)} does not fit {kind} scaling of a "
            f"{in_features} -> {out_features} layer (expected {list(expected)})"
        )
    return settings, vector
