"""LoRA adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a tensor ``base_model.model.<module>.lora_A.weight`` (``lora_B`` likewise), where
``<module>`` is the adapted layer's name in the bare model; the config gives the rank and alpha
(``rank_pattern`` / ``alpha_pattern`` override them per layer, matched as in
``peft.utils.other.get_pattern_key``: a key matches a module name ending with ``.<key>``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.nn import LoRALinear, NF4Linear
from lorakit.nn.lora_linear import LoraSettings
from lorakit.peft.adapters import active_adapter, finish_load, lora_layers
from lorakit.peft.base_record import write_base_record
from lorakit.peft.files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    peft_header,
    read_tensors,
    write_json,
    write_tensors,
)
from lorakit.peft.inject import (
    adaptable_layers,
    check_dtype,
    linear_features,
    put_adapter,
    target_names,
)
from lorakit.peft.target_check import check_targets_match
from lorakit.peft.whole_modules import (
    load_whole,
    saved_names,
    split_whole,
    whole_tensors,
)

_KEY = re.compile(rf"{re.escape(PREFIX)}(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# PEFT options that change what the files mean; lorakit refuses them rather than misread them.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


def save_lora(model: nn.Module, out: Path, name: str) -> None:
    """Writes LoRA adapter ``name`` in the PEFT format (see :func:`lorakit.save_adapter`).

    Raises:
        ValueError: its layers mix rsLoRA and plain scaling (PEFT has one ``use_rslora`` per
            adapter).
    """
    layers = {n: layer for n, layer in lora_layers(model) if name in layer.settings}
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in layers.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = layer.lora_A[name]
        tensors[f"{PREFIX}{module}.lora_B.weight"] = layer.lora_B[name]
    tensors.update(whole_tensors(model))
    config = peft_config(model, {n: layer.settings[name] for n, layer in layers.items()})
    write_tensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, config)
    write_base_record(out, [layer.base for layer in layers.values()])


def peft_config(model: nn.Module, settings: dict[str, LoraSettings]) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for layers ``settings`` (full module name -> settings)."""
    rslora = {s.use_rslora for s in settings.values()}
    if len(rslora) > 1:
        raise ValueError("the adapter mixes rsLoRA and plain scaling, which PEFT cannot express")
    r = Counter(s.r for s in settings.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in settings.values()).most_common(1)[0][0]
    dropout = Counter(s.dropout for s in settings.values()).most_common(1)[0][0]
    return {
        **peft_header(model, "LORA"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": target_names(model, set(settings)),
        "rank_pattern": {n: s.r for n, s in settings.items() if s.r != r},
        "alpha_pattern": {n: s.alpha for n, s in settings.items() if s.alpha != alpha},
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "exclude_modules": None,
        "layers_pattern": None,
        "modules_to_save": saved_names(model) or None,
        **_UNSUPPORTED,
    }


def load_lora(
    model: nn.Module, folder: Path, config: dict[str, Any], name: str, trainable: bool
) -> list[str]:
    """Loads the LoRA adapter in ``folder`` (config already read) as ``name``; see
    :func:`lorakit.load_adapter`. Layers without a LoRA adapter yet are wrapped in
    :class:`LoRALinear`; the others get one more adapter. Everything is checked first.

    Raises:
        ValueError: the config is not a LoRA config lorakit supports, a key matches no linear
            layer of ``model``, a layer already has adapter ``name``, a tensor's shape does
            not fit its layer, or ``target_modules`` pick other layers than the file holds
            weights for (:func:`~lorakit.peft.target_check.check_targets_match`).
    """
    _check_config(config, folder / CONFIG_NAME)
    tensors, whole, whole_names = split_whole(
        model,
        read_tensors(folder / WEIGHTS_NAME),
        list(config.get("modules_to_save") or []),
        folder / WEIGHTS_NAME,
    )
    pairs = _pairs(tensors, folder / WEIGHTS_NAME)
    adaptable = adaptable_layers(model)
    plan = {m: _plan(model, adaptable, m, a, b, config, name) for m, (a, b) in pairs.items()}
    check_targets_match(model, folder, config, plan, adaptable)
    previous = active_adapter(model)
    loaded = []
    for module, (settings, a, b) in plan.items():
        layer = put_adapter(model, module, LoRALinear, name, settings)
        with torch.no_grad():
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b)
        loaded.append(layer)
    finish_load(model, name, loaded, trainable, previous)
    load_whole(model, whole, whole_names, trainable)
    return sorted(plan)


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(n, str) for n in saved)
    ):
        raise ValueError(f"{path}: modules_to_save must be a list of names, got {saved!r}")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, [], {}):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by lorakit")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float):
            raise ValueError(f"{path}: {key} must be a number, got {config.get(key)!r}")


def _pairs(
    tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{path}: key {key!r} is not a LoRA weight (<prefix>.lora_A.weight)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise ValueError(f"{path} holds no LoRA weights")
    for module, found in parts.items():
        if set(found) != {"A", "B"}:
            raise ValueError(f"{path}: {module} has lora_{''.join(found)} but not both A and B")
    return {m: (found["A"], found["B"]) for m, found in parts.items()}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _plan(
    model: nn.Module,
    adaptable: set[str],
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    config: dict[str, Any],
    name: str,
) -> tuple[LoraSettings, torch.Tensor, torch.Tensor]:
    if module not in adaptable:
        raise ValueError(f"adapter weights for {module!r} match no linear layer of the model")
    layer = model.get_submodule(module)
    if isinstance(layer, LoRALinear) and name in layer.settings:
        raise ValueError(f"{module} already has a LoRA adapter named {name!r}")
    if not isinstance(layer, LoRALinear | NF4Linear):
        check_dtype(module, layer)
    in_features, out_features = linear_features(layer)
    r = a.shape[0] if a.dim() == 2 else -1
    if a.shape != (r, in_features) or b.shape != (out_features, r):
        raise ValueError(
            f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit a "
            f"{in_features} -> {out_features} layer (expected [r, {in_features}] and "
            f"[{out_features}, r])"
        )
    settings = LoraSettings(
        r=r,
        alpha=float(
            _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        ),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    settings.check(in_features, out_features)
    return settings, a, b
