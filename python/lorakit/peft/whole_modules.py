"""Modules trained whole beside an adapter (PEFT's ``modules_to_save``), such as a reward
model's ``score`` head: saved in the adapter file as ``base_model.model.<module>.<param>`` and
listed in ``adapter_config.json``'s ``modules_to_save`` by the names given here, as PEFT does."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.peft.files import PREFIX

# The model attribute recording the names (as given) of modules trained whole.
_ATTRIBUTE = "_lorakit_modules_to_save"


def _matching(model: nn.Module, name: str) -> list[str]:
    """Full names of ``model``'s modules called ``name`` or ending in ``.name`` (PEFT's rule)."""
    return [n for n, _ in model.named_modules() if n == name or n.endswith(f".{name}")]


def train_whole(model: nn.Module, names: list[str]) -> list[str]:
    """Lets every parameter of the modules ``names`` train and marks them to be saved with the
    adapter; returns their full names.

    Raises:
        ValueError: a name matches no module of ``model``.
    """
    found = []
    for name in names:
        modules = _matching(model, name)
        if not modules:
            raise ValueError(f"no module of {type(model).__name__} is called {name!r}")
        for full in modules:
            model.get_submodule(full).requires_grad_(True)
        found += modules
    marked = getattr(model, _ATTRIBUTE, [])
    object.__setattr__(model, _ATTRIBUTE, [*marked, *(n for n in names if n not in marked)])
    return found


def saved_names(model: nn.Module) -> list[str]:
    """The names :func:`train_whole` marked (PEFT's ``modules_to_save``), else empty."""
    return list(getattr(model, _ATTRIBUTE, []))


def whole_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the marked modules, keyed as PEFT saves them."""
    tensors = {}
    for name in saved_names(model):
        for full in _matching(model, name):
            for param, value in model.get_submodule(full).named_parameters():
                tensors[f"{PREFIX}{full}.{param}"] = value
    return tensors


def split_whole(
    model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Splits an adapter file's tensors into the adapter's and those of the modules ``names``
    (an adapter config's ``modules_to_save``; checked against ``model``: every parameter
    present, shapes equal), and returns the names that matched. A name that matches no module
    is skipped, as PEFT skips it (its sequence-classification task lists both ``classifier``
    and ``score`` whatever the model has), unless the file holds weights under it.

    Raises:
        ValueError: weights of a module the model lacks, or a module's tensors are missing or
            do not fit.
    """
    whole: dict[str, torch.Tensor] = {}
    present = []
    for name in names:
        modules = _matching(model, name)
        if not modules:
            held = [k for k in tensors if f".{name}." in f".{k.removeprefix(PREFIX)}"]
            if held:
                raise ValueError(
                    f"{path}: modules_to_save {name!r} matches no module of "
                    f"{type(model).__name__}, but the file holds its weights ({held[0]})"
                )
            continue
        present.append(name)
        for full in modules:
            for param, value in model.get_submodule(full).named_parameters():
                key = f"{PREFIX}{full}.{param}"
                if key not in tensors:
                    raise ValueError(f"{path}: {key} is missing (modules_to_save {name!r})")
                if tensors[key].shape != value.shape:
                    raise ValueError(
                        f"{path}: {key} has shape {list(tensors[key].shape)}, the model's "
                        f"{full}.{param} {list(value.shape)}"
                    )
                whole[key] = tensors[key]
    return {k: v for k, v in tensors.items() if k not in whole}, whole, present


def load_whole(
    model: nn.Module, whole: dict[str, torch.Tensor], names: list[str], trainable: bool
) -> None:
    """Copies tensors :func:`split_whole` checked into the model and marks their modules."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in whole.items():
            params[key.removeprefix(PREFIX)].copy_(value)
    if names:
        train_whole(model, names)
        if not trainable:
            for full in (m for n in names for m in _matching(model, n)):
                model.get_submodule(full).requires_grad_(False)
