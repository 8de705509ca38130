"""``lorakit ppo``: RLHF's PPO stage, every role on one frozen base.

The policy is a LoRA / QLoRA adapter (new, or ``--init-adapter`` continuing an SFT adapter); the
reference is the same model with its adapters disabled; the value model is one more adapter
(``value``) with a value head. The reward is one of: a Python function
``--reward-function module:function``; a reward adapter written by ``lorakit reward``
(``--reward-adapter``), loaded on the same base as one more named adapter with its score head; or
a reward model of its own (``--reward-model``, with ``--reward-adapter`` loaded on it when given).
Prompts come from ``--data`` (a ``prompt`` column, or chat ``messages`` without the final
assistant turn). See :mod:`lorakit.train.ppo` for the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.data.prompts import Prompt, load_prompts
from lorakit.generation import SamplingOptions
from lorakit.models import load_model, load_tokenizer, pad_id
from lorakit.models.heads import (
    ValueHead,
    add_value_adapter,
    check_reward_adapter,
    load_reward_adapter,
    value_from_reward_adapter,
)
from lorakit.recipes import reward as reward_recipe
from lorakit.recipes.common import RunConfig, result_path, save_result
from lorakit.recipes.grpo import (
    METHODS,
    GRPOResult,
    InitOptions,
    check_init_adapter,
    load_reward_function,
)
from lorakit.recipes.grpo import prepare_policy as prepare_grpo_policy
from lorakit.train import distributed, out_dir
from lorakit.train.ppo import PPOOptions, PPOTrainer
from lorakit.train.rollout_loop import RewardFunction


@dataclass
class PPOConfig(RunConfig):
    """PPO: the model, the adapters, the prompts, the loop, the sampling, the reward and PPO."""

    ppo: PPOOptions = field(default_factory=PPOOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    init: InitOptions = field(default_factory=InitOptions)


def _check_method(config: PPOConfig) -> None:
    if config.model.method not in METHODS:
        raise ValueError(
            f"PPO trains adapters (--method {' or '.join(METHODS)}); the reference is the base "
            f"with them disabled, got --method {config.model.method}"
        )


def _check(config: PPOConfig) -> None:
    _check_method(config)
    check_init_adapter(config.init, config.model.method)
    opts = config.ppo
    if bool(opts.reward_function) == bool(opts.reward_adapter or opts.reward_model):
        raise ValueError(
            "give one reward: --reward-function module:function, or --reward-adapter and / or "
            "--reward-model (a reward model from lorakit reward)"
        )
    if opts.reward_model:
        reward_recipe.check_reward_model(_reward_model_config(config))
    elif opts.reward_adapter:
        check_reward_adapter(opts.reward_adapter)


def _reward_model_config(config: PPOConfig) -> reward_recipe.RewardConfig:
    """``--reward-model`` (with ``--reward-adapter`` on it when given) as ``lorakit reward
    --score`` would load it."""
    return reward_recipe.RewardConfig(
        model=replace(config.model, model=config.ppo.reward_model, method="lora"),
        reward=reward_recipe.RewardOptions(adapter=config.ppo.reward_adapter),
    )


class ModelReward:
    """A reward model as a reward function: each (prompt, completion) rendered and scored as
    :func:`lorakit.recipes.reward.score` does (a chat prompt's completion as the assistant's
    turn; an empty completion, which preference rows cannot hold, as the EOS token's text)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
        texts = [c if c.strip() else self.tokenizer.eos_token or "." for c in completions]
        sides: list[Any] = [
            c if isinstance(p, str) else [{"role": "assistant", "content": c}]
            for p, c in zip(prompts, texts, strict=True)
        ]
        return reward_recipe.score(self.model, self.tokenizer, prompts, sides)


def own_reward_model(config: PPOConfig) -> RewardFunction:
    """``--reward-model`` (with ``--reward-adapter`` on it when given), loaded on its own."""
    reward_config = _reward_model_config(config)
    tokenizer = load_tokenizer(reward_config.model)
    model = reward_recipe.load_reward_model(reward_config, tokenizer)
    return ModelReward(model.requires_grad_(False), tokenizer)


def prepare(
    model: nn.Module, tokenizer: Any, config: PPOConfig, reward: RewardFunction | None = None
) -> tuple[ValueHead, RewardFunction]:
    """Puts every role on ``model``: the policy adapter (trainable, active), the reward adapter
    when ``--reward-adapter`` shares the base, the value adapter and head (trainable; a copy of
    the shared reward adapter's unless ``--value-init zero``, else V = 0). Returns
    the value head and the reward function (``reward`` when given, else the configured one)."""
    prepare_grpo_policy(model, config)
    opts = config.ppo
    if reward is not None:
        return add_value_adapter(model, config.lora), reward
    if opts.reward_function:
        return add_value_adapter(model, config.lora), load_reward_function(opts.reward_function)
    if opts.reward_model:
        return add_value_adapter(model, config.lora), own_reward_model(config)
    shared = ModelReward(
        load_reward_adapter(model, opts.reward_adapter, pad_id(tokenizer)), tokenizer
    )
    if opts.value_init != "zero":
        return value_from_reward_adapter(model, opts.reward_adapter), shared
    return add_value_adapter(model, config.lora), shared


def train(
    model: nn.Module,
    tokenizer: Any,
    config: PPOConfig,
    prompts: list[Prompt],
    reward: RewardFunction | None = None,
) -> GRPOResult:
    """Trains an already loaded ``model`` with PPO on ``prompts`` as ``config`` says (``reward``
    overrides the configured reward) and saves the policy adapter."""
    if reward is None:
        _check(config)
    else:
        _check_method(config)
    head, scorer = prepare(model, tokenizer, config, reward)
    trainer = PPOTrainer(
        model, tokenizer, config.train, config.ppo, config.sampling, prompts, scorer, head, config
    )
    # The lock spans training and saving, so no other run writes out between them.
    with out_dir.claim(Path(config.train.out)):
        result = trainer.fit()
        if not distributed.is_main():
            return GRPOResult(result, result_path(config), {})
        save_result(model, tokenizer, config)
    lines = result.metrics.read_text().splitlines()
    return GRPOResult(result, result_path(config), json.loads(lines[-1]) if lines else {})


def run(config: PPOConfig) -> GRPOResult:
    """Loads ``config.model.model`` and trains it with PPO; the options, the reward function
    and the prompts are checked before the model is loaded."""
    _check(config)
    # Imported once (its top-level code runs once), before anything heavy.
    function = (
        load_reward_function(config.ppo.reward_function) if config.ppo.reward_function else None
    )
    tokenizer = load_tokenizer(config.model)
    prompts = load_prompts(config.data.data, tokenizer)
    return train(load_model(config.model), tokenizer, config, prompts, function)


def main(config: PPOConfig) -> str:
    """``lorakit ppo``: what it prints when done."""
    result = run(config)
    if not distributed.is_main():
        return ""
    last = result.last
    return "\n".join(
        [
            f"trained {result.train.steps} PPO steps in {result.train.seconds:.0f} s; last "
            f"reward {last.get('reward_mean', float('nan')):.3f} (std "
            f"{last.get('reward_std', float('nan')):.3f}), KL {last.get('kl', 0.0):.4f}, "
            f"value loss {last.get('value_loss', float('nan')):.4f}",
            f"saved {result.saved}; metrics {result.train.metrics}; plot {result.train.plot}",
        ]
    )
