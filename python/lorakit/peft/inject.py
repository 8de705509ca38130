"""Puts LoRA adapters into any torch model, in place; finds the layers any method targets."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.nn import AdapterLayer, IA3Linear, LoRALinear, NF4Linear
from lorakit.nn.lora_linear import LoraSettings
from lorakit.peft.config import ALL_LINEAR, LoraConfig
from lorakit.peft.files import is_sequence_classifier

try:  # GPT-2-style models store linear weights transposed in transformers' Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core usable
    Conv1D = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`apply_lora` (or ``apply_ia3``, ``apply_prefix_tuning``) did.

    Attributes:
        replaced: full names of the layers (or modules) that got an adapter.
        trainable: parameters that train (the adapters).
        total: all parameters, NF4 weights counted by their number of weights.
    """

    replaced: tuple[str, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {share:.4f} ({len(self.replaced)} layers adapted)"
        )


LoraReport = AdapterReport  # the name apply_lora's report had first


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | NF4Linear) or (
        Conv1D is not None and isinstance(module, Conv1D)
    )


def matches_targets(name: str, targets: list[str] | str) -> bool:
    """PEFT's ``target_modules`` rule for module ``name``: a string is a regular expression that
    must match the full name; a list entry must equal the name or its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def adaptable_layers(model: nn.Module, wrapper: type[AdapterLayer] = LoRALinear) -> set[str]:
    """Names of the layers that an adapter of ``wrapper``'s method can go on: the ``wrapper``
    layers (one more adapter beside theirs) and the linear layers no adapter wraps yet.

    A layer wrapped by another method is left out: lorakit puts one method on a layer.
    """
    modules = dict(model.named_modules())
    wrapped = {n for n, m in modules.items() if isinstance(m, AdapterLayer)}
    own = {n for n, m in modules.items() if isinstance(m, wrapper)}
    return own | {
        n for n, m in modules.items() if _is_linear(m) and n.rpartition(".")[0] not in wrapped
    }


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    wrapper: type[AdapterLayer] = LoRALinear,
) -> list[str]:
    """Full names of the layers ``target_modules`` picks (see :class:`LoraConfig`) for an adapter
    of ``wrapper``'s method.

    Raises:
        ValueError: nothing matches (the message lists the linear layer names), or a match is
            not a linear layer (nor a ``wrapper`` layer).
    """
    adaptable = adaptable_layers(model, wrapper)
    if target_modules == ALL_LINEAR:
        return all_linear(model, adaptable)
    matched = [n for n, _ in model.named_modules() if n and matches_targets(n, target_modules)]
    if not matched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
        # PEFT's rule: a string is a regular expression for the whole name, so 'q_proj' alone
        # matches no layer although the list ['q_proj'] matches every q_proj.
        regex = ""
        if (
            adaptable
            and isinstance(target_modules, str)
            and re.fullmatch(r"[\w.]+", target_modules)
        ):
            deepest = min(adaptable, key=lambda n: (-n.count("."), n))
            regex = (
                f" (one string is a regular expression for the full name, such as {deepest!r}; "
                f"the list ['{target_modules}'] matches name endings)"
            )
        raise ValueError(
            f"target_modules {target_modules!r} match no module of "
            f"{type(model).__name__}; its linear layers are named {leaf_names}{regex}"
        )
    wrong = [n for n in matched if n not in adaptable]
    if wrong:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in wrong})
        raise ValueError(
            f"target_modules match {wrong[:5]} which are {kinds}, not linear layers; "
            f"{wrapper.method} applies to nn.Linear, NF4Linear and transformers' Conv1D "
            "(a layer holds adapters of one method only)"
        )
    return matched


def all_linear(model: nn.Module, adaptable: set[str]) -> list[str]:
    """The layers among ``adaptable`` that ``target_modules="all-linear"`` picks: all but the
    output projection (lm_head) and a sequence classifier's head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # A classifier's head (a reward model's score) trains whole, as PEFT's SEQ_CLS does.
    heads = {"score", "classifier"} if is_sequence_classifier(model) else set()
    return sorted(n for n in adaptable if model.get_submodule(n) is not output and n not in heads)


def target_names(model: nn.Module, modules: set[str]) -> list[str]:
    """``target_modules`` for a PEFT config that picks exactly ``modules``: their leaf names
    (q_proj, ...) when those pick no other linear or adapted layer, else the full names."""
    leaves = {n.rpartition(".")[2] for n in modules}
    candidates = {
        n for n, m in model.named_modules() if _is_linear(m) or isinstance(m, AdapterLayer)
    }
    picked = {n for n in candidates if n.rpartition(".")[2] in leaves}
    return sorted(leaves if picked == modules else modules)


def as_linear(module: nn.Module) -> nn.Linear | NF4Linear:
    if isinstance(module, nn.Linear | NF4Linear):
        return module
    # Conv1D computes x W + b with W (in, out): the same layer as nn.Linear with Wᵀ.
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
    linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def check_dtype(name: str, base: nn.Module) -> None:
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: an adapter needs a float32, float16 or bfloat16 weight: {dtype}")
    bias = base.bias
    if bias is not None and bias.dtype != dtype:
        raise ValueError(
            f"{name}: weight is {dtype} but bias is {bias.dtype}; cast the model to one dtype"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; an NF4 weight counts as its number of weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # NF4 storage (uint8 parameters of packed codes and scales) counts as its weights instead.
    total = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    total += sum(math.prod(m.weight.shape) for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def train_only(model: nn.Module, name: str, replaced: list[str]) -> AdapterReport:
    """Freezes ``model`` except adapter ``name``, which becomes every adapter layer's active one.

    Returns:
        The report of an ``apply_*`` call that put ``name`` on the modules ``replaced``.
    """
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.set_adapter(name)
            for parameter in module.adapter_parameters(name):
                parameter.requires_grad_(True)
    trainable, total = count_parameters(model)
    return AdapterReport(replaced=tuple(replaced), trainable=trainable, total=total)


def apply_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> AdapterReport:
    """Adds a LoRA adapter called ``name`` to the targeted linear layers of ``model``, in place.

    A plain linear layer is replaced by a :class:`LoRALinear`; one that already is gets another
    adapter beside its others. With ``config.quantize == "nf4"`` each newly wrapped layer's frozen
    weight is quantized to NF4 on its device (QLoRA). Afterwards ``name`` is the active adapter of
    every LoRA layer and the only thing that trains: every other parameter is frozen.

    Args:
        model: any ``nn.Module`` (Hugging Face Llama, Qwen2, Mistral, GPT-2 included).
        config: which layers and how.
        name: the adapter's name (see :func:`lorakit.set_adapter`).

    Returns:
        The adapted layers and the trainable / total parameter counts.

    Raises:
        ValueError: nothing matches (the message lists the model's linear layer names), a match
            is not a linear layer or already has an adapter of that name, a rank does not fit a
            layer, or a layer's dtypes cannot work together. The model is then left as it was.
    """
    names = find_targets(model, config.target_modules)
    settings = LoraSettings(config.r, config.alpha, config.dropout, config.use_rslora)
    for target in names:  # every check first, so that an error leaves the model as it was
        module = model.get_submodule(target)
        if isinstance(module, LoRALinear):
            check_can_add(target, module, name, config.quantize)
        else:
            check_dtype(target, module)
        try:
            settings.check(*linear_features(module))
        except ValueError as e:
            raise ValueError(f"{target}: {e}") from e

    def make_base(module: nn.Module) -> nn.Module:
        return frozen_base(module, config.quantize, config.blocksize, config.double_quant)

    for target in names:
        put_adapter(model, target, LoRALinear, name, settings, make_base)
    return train_only(model, name, names)


def put_adapter(
    model: nn.Module,
    target: str,
    wrapper: type[AdapterLayer],
    name: str,
    settings: Any,
    make_base: Callable[[nn.Module], nn.Module] = as_linear,
) -> AdapterLayer:
    """Gives layer ``target`` adapter ``name``: added beside the others of a ``wrapper`` layer,
    or in a new ``wrapper`` around ``make_base(layer)``, which replaces it in ``model``."""
    layer = model.get_submodule(target)
    if isinstance(layer, wrapper):
        layer.add_adapter(name, settings)
        return layer
    wrapped = wrapper.wrap(make_base(layer), name, settings)
    replace_module(model, target, wrapped)
    return wrapped


def frozen_base(
    module: nn.Module, quantize: str | None, blocksize: int, double_quant: bool
) -> nn.Linear | NF4Linear:
    """The base an adapter wraps: ``module`` as a linear layer, in NF4 if asked (QLoRA)."""
    base = as_linear(module)
    if quantize == "nf4" and isinstance(base, nn.Linear):
        base = NF4Linear.from_linear(base, blocksize, double_quant)
    return base


def quantize_layers(
    model: nn.Module, targets: list[str], blocksize: int, double_quant: bool
) -> None:
    """Puts the NF4 copy of each layer ``targets`` names in its place (QLoRA's frozen base),
    so that an adapter loaded afterwards wraps the quantized layer."""
    for target in targets:
        base = frozen_base(model.get_submodule(target), "nf4", blocksize, double_quant)
        replace_module(model, target, base)


def check_can_add(
    target: str, layer: LoRALinear | IA3Linear, name: str, quantize: str | None
) -> None:
    """Raises ValueError unless ``layer`` can take one more adapter called ``name``."""
    if name in layer.settings:
        article = "an" if layer.method[0] in "AEIOU" else "a"
        raise ValueError(f"{target} already has {article} {layer.method} adapter named {name!r}")
    if layer.merged_adapter is not None:
        raise ValueError(f"{target}: adapter {layer.merged_adapter!r} is merged; unmerge it first")
    if quantize == "nf4" and not isinstance(layer.base, NF4Linear):
        raise ValueError(f"{target} already has a dense base weight; quantize='nf4' cannot apply")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, Conv1D (weight stored (in, out)) included."""
    if isinstance(module, nn.Linear | NF4Linear | LoRALinear | IA3Linear):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return rows, cols


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
