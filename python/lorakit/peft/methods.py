"""Fine-tuning methods by name: the one place a recipe looks a method up.

A method turns a loaded model into one whose trainable parameters are what training should
update, and reports the counts. Each takes its options from one group of the recipe's config
(``config_group``, e.g. ``RunConfig.lora``), or none. To add a method: write its ``apply_*``,
add an entry to :data:`METHODS` and its name to :data:`MethodName` (the CLI's choices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from torch import nn

from lorakit.peft.bottleneck import apply_bottleneck
from lorakit.peft.config import LoraConfig
from lorakit.peft.full import apply_full
from lorakit.peft.ia3 import apply_ia3
from lorakit.peft.inject import AdapterReport, apply_lora
from lorakit.peft.prefix import apply_prefix_tuning

MethodName = Literal["full", "lora", "qlora", "ia3", "prefix", "bottleneck"]


@dataclass(frozen=True)
class Method:
    """How to apply one method: ``apply(model, options)``, options from ``config_group``."""

    apply: Callable[[nn.Module, Any], AdapterReport]
    config_group: str | None
    help: str


def _lora(quantize: Literal["nf4"] | None) -> Callable[[nn.Module, LoraConfig], AdapterReport]:
    return lambda model, config: apply_lora(model, replace(config, quantize=quantize))


METHODS: dict[str, Method] = {
    "full": Method(lambda model, _: apply_full(model), None, "train every weight"),
    "lora": Method(_lora(None), "lora", "frozen base + trainable low-rank adapters"),
    "qlora": Method(_lora("nf4"), "lora", "the same with the frozen base in 4-bit NF4"),
    "ia3": Method(
        apply_ia3, "ia3", "frozen base + learned vectors scaling keys, values and FFN activations"
    ),
    "prefix": Method(
        apply_prefix_tuning,
        "prefix",
        "frozen base + learned key / value prefixes for every attention layer",
    ),
    "bottleneck": Method(
        apply_bottleneck,
        "bottleneck",
        "frozen base + small trainable MLPs after the attention and / or MLP blocks",
    ),
}
assert set(METHODS) == set(get_args(MethodName)), "METHODS and MethodName must list the same"


def apply_method(model: nn.Module, method: str, configs: Any) -> AdapterReport:
    """Applies ``method`` to ``model`` in place with its options from ``configs.<config_group>``.

    Raises:
        ValueError: an unknown method, or the method's own errors.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    spec = METHODS[method]
    options = getattr(configs, spec.config_group) if spec.config_group else None
    return spec.apply(model, options)


def methods_help() -> str:
    """One line per method, for the CLI's help."""
    return "; ".join(f"{name}: {spec.help}" for name, spec in METHODS.items()) + "."
