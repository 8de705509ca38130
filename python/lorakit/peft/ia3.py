"""IA3: configuration and injection of learned scaling vectors into any torch model, in place."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lorakit.nn import IA3Linear
from lorakit.nn.ia3_linear import IA3Settings
from lorakit.peft.config import check_quantize, normalize_targets
from lorakit.peft.inject import (
    AdapterReport,
    check_can_add,
    check_dtype,
    find_targets,
    frozen_base,
    put_adapter,
    train_only,
)

# PEFT 0.21.2's defaults per model_type (peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_
# MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING): (target_modules, feedforward_modules).
# tests/test_ia3.py checks every entry against the installed peft.
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@dataclass
class IA3Config:
    """Which layers get (IA)³ vectors, which scale their input, and how the base is stored."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Layers to adapt, matched as in LoraConfig (names or name endings, a regular "
            "expression, or 'all-linear'); None takes PEFT's default for the model's "
            f"model_type (known: {', '.join(sorted(IA3_DEFAULTS))})."
        },
    )
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Targeted layers whose input is scaled instead of their output (the "
            "feed-forward activation); matched as PEFT matches them: a name ending (no dot "
            "needed) or a regular expression for the full name. None takes PEFT's default for "
            "the model_type."
        },
    )
    quantize: Literal["nf4"] | None = field(
        default=None,
        metadata={"help": "Store the adapted layers' frozen weights in 4-bit NF4 (QLoRA-style)."},
    )
    blocksize: int = field(
        default=64, metadata={"help": "Weights per NF4 scale (32 to 4096, a power of two)."}
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "Store NF4 scales in 8 bits (QLoRA's double quantization)."},
    )

    def __post_init__(self) -> None:
        check_quantize(self.quantize, self.blocksize)
        self.target_modules = normalize_targets(self.target_modules)
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; name the layers to adapt or leave it None")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            # PEFT's own check, so that a config means the same in both libraries
            raise ValueError(f"feedforward_modules {ff} must be a subset of target_modules")


def is_feedforward(module: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule (``IA3Model._check_target_module_feedforward``): a regular expression must
    match the full name; a list entry need only end it, with no dot boundary."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module.endswith(key) for key in feedforward_modules)


def resolve(model: nn.Module, config: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    """(target_modules, feedforward_modules) with PEFT's defaults for the model filled in."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = IA3_DEFAULTS.get(model_type or "")
    if default is None and (config.target_modules is None or config.feedforward_modules is None):
        raise ValueError(
            f"IA3 has no default target_modules / feedforward_modules for model_type "
            f"{model_type!r} (known: {sorted(IA3_DEFAULTS)}); give both in IA3Config "
            "(feedforward_modules=[] for none)"
        )
    targets = config.target_modules if config.target_modules is not None else default[0]
    ff = config.feedforward_modules if config.feedforward_modules is not None else default[1]
    return targets, ff


def apply_ia3(model: nn.Module, config: IA3Config, name: str = "default") -> AdapterReport:
    """Adds an (IA)³ adapter called ``name`` to the targeted linear layers of ``model``, in place.

    A plain linear layer (``nn.Linear``, :class:`~lorakit.nn.NF4Linear`, GPT-2's ``Conv1D``) is
    replaced by an :class:`~lorakit.nn.IA3Linear`; one that already is gets another adapter. The
    vectors start at ones (the model computes as before). Afterwards ``name`` is the active
    adapter and the only thing that trains.

    Args:
        model: any ``nn.Module``; Hugging Face models of a known ``model_type`` need no
            target_modules.
        config: which layers and how.
        name: the adapter's name (see :func:`lorakit.set_adapter`).

    Returns:
        The adapted layers and the trainable / total parameter counts.

    Raises:
        ValueError: no default for the architecture, nothing matches (the message lists the
            linear layer names), a match is not a linear layer or already has an adapter of that
            name, or a layer's dtypes cannot work together. The model is then left as it was.
    """
    targets, ff = resolve(model, config)
    names = find_targets(model, targets, IA3Linear)
    for target in names:  # every check first, so that an error leaves the model as it was
        module = model.get_submodule(target)
        if isinstance(module, IA3Linear):
            check_can_add(target, module, name, config.quantize)
        else:
            check_dtype(target, module)

    def make_base(module: nn.Module) -> nn.Module:
        return frozen_base(module, config.quantize, config.blocksize, config.double_quant)

    for target in names:
        settings = IA3Settings(feedforward=is_feedforward(target, ff))
        put_adapter(model, target, IA3Linear, name, settings, make_base)
    return train_only(model, name, names)
