"""Several named adapters on one frozen base: list them, switch between them, switch them off.

These work on every :class:`~lorakit.nn.AdapterLayer` of a model, whatever its method (LoRA, IA3,
prefix tuning): one name may even span several methods' layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorakit.nn import AdapterLayer, LoRALinear


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's :class:`LoRALinear` layers with their full names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """The model's adapter modules of every method with their full names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name that some layer of ``model`` holds, sorted."""
    return sorted({name for _, layer in adapter_layers(model) for name in layer.settings})


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that forward uses (None when the model has no adapter layer)."""
    active = {layer.active_adapter for _, layer in adapter_layers(model)}
    if len(active) > 1:  # only reachable by calling AdapterLayer.set_adapter layer by layer
        raise ValueError(f"the adapter layers disagree on the active adapter: {sorted(active)}")
    return next(iter(active), None)


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes ``name`` the active adapter of every adapter layer; copies no weight.

    Layers that lack ``name`` then pass their base through. Which parameters train is left as it
    is (see :func:`lorakit.apply_lora` and :func:`lorakit.load_adapter`).

    Raises:
        KeyError: no layer holds an adapter called ``name``.
        ValueError: another adapter is merged into the base weights.
    """
    names = adapter_names(model)
    if name not in names:
        raise KeyError(f"no adapter named {name!r}; the model has {names}")
    for _, layer in adapter_layers(model):
        layer.set_adapter(name)


def finish_load(
    model: nn.Module, name: str, loaded: list[AdapterLayer], trainable: bool, previous: str | None
) -> None:
    """The end of every ``load_adapter``: adapter ``name`` (on ``loaded``) trains or not, every
    other adapter keeps its flags, everything else freezes, and ``previous`` (the active adapter
    before the load) stays active, or ``name`` when there was none."""
    keep = {
        id(p)
        for _, layer in adapter_layers(model)
        for adapter in layer.settings
        for p in layer.adapter_parameters(adapter)
    }
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)
    for layer in loaded:
        for parameter in layer.adapter_parameters(name):
            parameter.requires_grad_(trainable)
    set_adapter(model, previous or name)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes with its frozen base alone (no weight is copied).

    This is the reference model of DPO and PPO for free: ``with disable_adapters(policy): ...``.

    Raises:
        ValueError: an adapter is merged into the base weights (unmerge it first).
    """
    layers = [layer for _, layer in adapter_layers(model)]
    merged = sorted({m for layer in layers if (m := layer.merged_adapter) is not None})
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is merged into the base; unmerge it first")
    previous = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapters_enabled = enabled


@contextmanager
def using_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Within the block, adapter ``name`` is the active one (see :func:`set_adapter`; no weight
    is copied); the adapter active before is restored after it."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        if previous is not None:
            set_adapter(model, previous)
