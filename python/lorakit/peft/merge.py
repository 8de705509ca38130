"""Folding LoRA and IA3 adapters into the base weights, in place, and the merged tensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit import ops
from lorakit.nn import IA3Linear, LoRALinear, NF4Linear
from lorakit.peft.adapters import adapter_layers, set_adapter


def merge_adapter(model: nn.Module, name: str | None = None) -> int:
    """Adds adapter ``name`` (default: the active one) into the base weights, in place.

    Forward then costs what the base model costs. LoRA: ``W += s B A``; NF4 weights are quantized
    again, which changes the layer's output a little beyond the adapter (measured in
    tests/test_merge_model.py and the README); :func:`merge_and_export` avoids that by writing
    dense weights. IA3: W's rows (and the bias) are scaled by ``l``, or its columns for a
    feed-forward layer; NF4 weights are quantized again (rows keep their codes and move by the
    8-bit scales' rounding, columns by about one NF4 rounding: tests/test_ia3_nf4_merge.py).

    Returns:
        The number of layers merged.

    Raises:
        ValueError: an adapter is already merged, no layer holds the adapter, or some layer's
            adapter cannot be merged (prefix tuning, bottleneck, IA3 with a zero scale); the
            model is then unchanged.
    """
    if name is not None:
        set_adapter(model, name)
    layers = [layer for _, layer in adapter_layers(model) if layer.active_adapter in layer.settings]
    if not layers:
        raise ValueError("the model has no adapter layer holding the active adapter")
    merged = [layer.merged_adapter for layer in layers if layer.merged_adapter is not None]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is already merged; unmerge it first")
    for layer in layers:  # every check first, so that a refusal leaves the model as it was
        layer.check_merge(layer.active_adapter)  # refuses the kinds that do not merge
        check_finite(layer)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapter(model: nn.Module) -> int:
    """Takes the merged adapter out of the base weights again; returns the layers unmerged.

    Dense weights come back within a rounding or two of their dtype (IA3 divides by ``l``); NF4
    weights are quantized once more, so they come back within about one NF4 step (see the tests;
    an IA3 row scaled by ``|l|`` near 0 comes back with its 8-bit scale's error over ``|l|``).
    """
    layers = [layer for _, layer in adapter_layers(model) if layer.merged_adapter is not None]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def check_finite(layer: LoRALinear | IA3Linear) -> None:
    """Raises ValueError if the active adapter's tensors or scaling hold NaN or Inf: merged,
    they would silently turn the whole weight into NaN."""
    name = layer.active_adapter
    if isinstance(layer, LoRALinear):
        tensors = [layer.lora_A[name], layer.lora_B[name]]
        if not math.isfinite(layer.settings[name].scaling):
            raise ValueError(f"LoRA adapter {name!r} has a non-finite scaling (lora_alpha)")
    else:
        tensors = [layer.ia3_l[name]]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{layer.method} adapter {name!r} holds NaN or infinite values")


def merged_weight(layer: LoRALinear | IA3Linear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight with the active adapter folded in: float32 math, rounded to ``dtype``.

    Raises:
        ValueError: the adapter holds NaN or Inf (:func:`check_finite`).
    """
    base = layer.base
    if isinstance(base, NF4Linear):
        weight = base.weight.dequantize(torch.float32)
    else:
        weight = base.weight.detach().to(torch.float32, copy=True)
    if layer.uses_adapter():
        check_finite(layer)
        name = layer.active_adapter
        if isinstance(layer, LoRALinear):
            scaling = layer.settings[name].scaling
            ops.lora_merge_(weight, layer.lora_A[name], layer.lora_B[name], scaling)
        else:  # IA3: an (out, 1) column scales rows, a (1, in) row scales columns
            weight *= layer.ia3_l[name].detach().to(torch.float32)
    return weight.to(dtype)


def merged_bias(layer: LoRALinear | IA3Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """The base bias, scaled by an IA3 output vector when one is active, rounded to ``dtype``."""
    bias = layer.base.bias
    if bias is None:
        return None
    bias = bias.detach().to(torch.float32)
    name = layer.active_adapter
    if isinstance(layer, IA3Linear) and layer.uses_adapter():
        if not layer.settings[name].feedforward:
            bias = bias * layer.ia3_l[name].detach().to(torch.float32).flatten()
    return bias.to(dtype)
