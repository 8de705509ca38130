"""``lorakit grpo``: group relative policy optimisation against a verifiable reward.

The policy is a LoRA / QLoRA adapter on one frozen base (start from a merged SFT model, or
continue an SFT adapter with ``--init-adapter``); the reference is the same model with its
adapters disabled, so the base exists once in memory. Prompts come from ``--data`` (a ``prompt``
column, or chat ``messages`` without the final assistant turn); the reward is a Python function
``module:function(prompts, completions, **other_columns) -> rewards``, e.g. one that checks an
``answer`` column. See :mod:`lorakit.train.grpo` for the loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.data.prompts import Prompt, load_prompts
from lorakit.generation import SamplingOptions
from lorakit.models import load_model, load_tokenizer
from lorakit.peft import AdapterReport, load_adapter
from lorakit.peft.base_record import BASE_NAME, read_base_record
from lorakit.peft.config import normalize_targets
from lorakit.peft.files import read_adapter_config
from lorakit.peft.inject import count_parameters, find_targets, quantize_layers
from lorakit.recipes.common import RunConfig, make_trainable, result_path, save_result
from lorakit.train import distributed, out_dir
from lorakit.train.grpo import GRPOOptions, GRPOTrainer, RewardFunction
from lorakit.train.trainer import TrainResult
from lorakit.user_code import raised_in_user_code

# Methods whose policy is an adapter that can be switched off for the reference.
METHODS = ("lora", "qlora")


@dataclass
class InitOptions:
    """Where the policy's adapter starts."""

    init_adapter: str = field(
        default="",
        metadata={
            "path": True,
            "help": "Continue this LoRA adapter (e.g. lorakit sft's out/adapter) instead of a "
            "new one: on the base in NF4 with --method qlora, as loaded with --method lora. An "
            "adapter lorakit wrote records its base (lorakit_base.json): another --method is "
            "refused, and NF4 is quantized as recorded. The reference is that base without it.",
        },
    )


@dataclass
class GRPOConfig(RunConfig):
    """GRPO: the model, the adapter, the prompts, the loop, the sampling and the GRPO loss."""

    grpo: GRPOOptions = field(default_factory=GRPOOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    init: InitOptions = field(default_factory=InitOptions)


def load_reward_function(spec: str) -> RewardFunction:
    """The function ``spec`` names: ``package.module:function`` (importable) or
    ``path/to/file.py:function``.

    Raises:
        ValueError: a malformed name, or a module or function that cannot be found.
    """
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise ValueError(
            f"--reward-function {spec!r}: expected module:function or file.py:function"
        )
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise ValueError(f"--reward-function {spec!r}: {module_name} does not exist")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward-function {spec!r}: cannot import {module_name}: {e}") from None
    except Exception as e:  # the user's module fails as it runs: its error and where, one line
        raise ValueError(
            f"--reward-function {spec!r}: importing {module_name} raised {raised_in_user_code(e)}"
        ) from e
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward-function {spec!r}: {module_name} has no function {name!r}")
    return function


def check_init_adapter(options: InitOptions, method: str) -> None:
    """Refuses an ``--init-adapter`` that is no causal LM's LoRA adapter (another method's
    adapter would train in the LoRA policy's place, and a reward adapter's score head has no
    place on a causal LM), or whose recorded base (:mod:`lorakit.peft.base_record`) is not the
    one ``method`` gives: a QLoRA adapter learned against the NF4-rounded weights.

    Raises:
        FileNotFoundError: the adapter folder has no ``adapter_config.json``.
        ValueError: naming the folder and what it holds.
    """
    if not options.init_adapter:
        return
    config = read_adapter_config(Path(options.init_adapter))
    kind, task = config.get("peft_type"), config.get("task_type")
    if kind != "LORA" or task not in (None, "CAUSAL_LM"):
        raise ValueError(
            f"--init-adapter {options.init_adapter} holds peft_type {kind!r}, task_type "
            f"{task!r}; the policy continues a causal LM's LoRA adapter (peft_type 'LORA', as "
            "lorakit sft --method lora or qlora writes)"
        )
    record = read_base_record(Path(options.init_adapter))
    if record is not None and (record["quantize"] == "nf4") != (method == "qlora"):
        trained, fits = ("an NF4", "qlora") if record["quantize"] else ("a dense", "lora")
        raise ValueError(
            f"--init-adapter {options.init_adapter} was trained on {trained} base "
            f"({BASE_NAME}); continue it with --method {fits}, not --method {method}"
        )


def _check(config: GRPOConfig) -> None:
    if config.model.method not in METHODS:
        raise ValueError(
            f"GRPO trains an adapter (--method {' or '.join(METHODS)}); the reference is the "
            f"base with it disabled, got --method {config.model.method}"
        )
    if not config.grpo.reward_function:
        raise ValueError("missing --reward-function (module:function)")
    check_init_adapter(config.init, config.model.method)


def prepare_policy(model: nn.Module, config: GRPOConfig) -> AdapterReport:
    """Makes ``model`` a trainable policy: a new adapter (``config.model.method``) or the one
    ``--init-adapter`` names, loaded trainable."""
    folder = config.init.init_adapter
    if not folder:
        return make_trainable(model, config)
    if config.model.method == "qlora":  # the layers it adapts in NF4, as a new adapter's are
        targets = normalize_targets(read_adapter_config(Path(folder)).get("target_modules"))
        record = read_base_record(Path(folder)) or {}
        blocksize = record.get("blocksize", config.lora.blocksize)
        double_quant = record.get("double_quant", config.lora.double_quant)
        quantize_layers(model, find_targets(model, targets), blocksize, double_quant)
    load_adapter(model, folder, trainable=True)
    trainable, total = count_parameters(model)
    return AdapterReport([], trainable, total)


@dataclass(frozen=True)
class GRPOResult:
    train: TrainResult
    saved: Path
    last: dict[str, Any]
    """The last step's metrics record."""


def train(
    model: nn.Module,
    tokenizer: Any,
    config: GRPOConfig,
    prompts: list[Prompt],
    reward: RewardFunction,
) -> GRPOResult:
    """Trains an already loaded ``model`` with GRPO on ``prompts`` and ``reward`` as ``config``
    says, and saves the adapter."""
    _check(config)
    prepare_policy(model, config)
    # The lock spans training and saving, so no other run writes out between them.
    with out_dir.claim(Path(config.train.out)):
        result = GRPOTrainer(
            model,
            tokenizer,
            config.train,
            config.grpo,
            config.sampling,
            prompts,
            reward,
            config,
        ).fit()
        if not distributed.is_main():
            return GRPOResult(result, result_path(config), {})
        save_result(model, tokenizer, config)
    lines = result.metrics.read_text().splitlines()
    return GRPOResult(result, result_path(config), json.loads(lines[-1]) if lines else {})


def run(config: GRPOConfig) -> GRPOResult:
    """Loads ``config.model.model`` and trains it with GRPO; the reward function and the prompts
    are checked before the model is loaded."""
    _check(config)
    reward = load_reward_function(config.grpo.reward_function)
    tokenizer = load_tokenizer(config.model)
    prompts = load_prompts(config.data.data, tokenizer)
    return train(load_model(config.model), tokenizer, config, prompts, reward)


def main(config: GRPOConfig) -> str:
    """``lorakit grpo``: what it prints when done."""
    result = run(config)
    if not distributed.is_main():
        return ""
    last = result.last
    return "\n".join(
        [
            f"trained {result.train.steps} GRPO steps in {result.train.seconds:.0f} s; last "
            f"reward {last.get('reward_mean', float('nan')):.3f} (std "
            f"{last.get('reward_std', float('nan')):.3f}), KL {last.get('kl', 0.0):.4f}",
            f"saved {result.saved}; metrics {result.train.metrics}; plot {result.train.plot}",
        ]
    )
