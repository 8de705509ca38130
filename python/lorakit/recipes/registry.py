"""Every ``lorakit`` subcommand by name: the one place the CLI looks them up.

A command is its config dataclass (its options, help texts and YAML keys are generated from
the fields: :mod:`lorakit.config_args`) and a function that runs it and returns what to print.
To add a recipe: write its module (config dataclass beside its ``run``) and add an entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.recipes import (
    compare,
    constitutional,
    convert,
    demo,
    dpo,
    grpo,
    merge,
    ppo,
    reward,
    sft,
)
from lorakit.recipes.common import RunConfig, summary
from lorakit.recipes.pretrain import PretrainConfig
from lorakit.train import distributed

# Options of every training recipe that have no useful default.
TRAINING_REQUIRED = frozenset({"model", "data"})


@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(config)`` returns the text to print."""

    help: str
    config: type
    run: Callable[[Any], str]
    required: frozenset[str] = frozenset()
    description: str | None = None
    # Joins torchrun's process group (under torchrun; a no-op otherwise); only rank 0 prints.
    distributed: bool = False


def _training(run: Callable[[Any], Any]) -> Callable[[RunConfig], str]:
    def main(config: RunConfig) -> str:
        result = run(config)
        return summary(result) if distributed.is_main() else ""

    return main


def _info(_: object) -> str:
    import lorakit

    return "\n".join(f"{k}: {v}" for k, v in vars(lorakit.build_info()).items())


@dataclass
class InfoConfig:
    """``lorakit info`` takes no options."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "pre-train a tiny Llama on invented facts, QLoRA-SFT it, test it on held-out facts",
        demo.DemoConfig,
        lambda config: demo.format_report(demo.run(config)),
    ),
    "sft": Command(
        "supervised fine-tuning (chat, alpaca, prompt/completion data)",
        sft.SFTConfig,
        _training(sft.run),
        TRAINING_REQUIRED,
        distributed=True,
    ),
    "pretrain": Command(
        "continued pre-training on plain text (every token trained on)",
        PretrainConfig,
        _training(sft.run),
        TRAINING_REQUIRED,
        distributed=True,
    ),
    "reward": Command(
        "train a reward model (scalar head) on preference pairs; or --score rows with one",
        reward.RewardConfig,
        reward.main,
        frozenset({"model"}),
        reward.__doc__,
        distributed=True,
    ),
    "dpo": Command(
        "direct preference optimisation on preference pairs (reference = adapters disabled)",
        dpo.DPOConfig,
        _training(dpo.run),
        TRAINING_REQUIRED,
        dpo.__doc__,
        distributed=True,
    ),
    # ---- reinforcement learning (rollout loops)
    "grpo": Command(
        "GRPO: sample groups of completions, score them with a reward function, clipped updates",
        grpo.GRPOConfig,
        grpo.main,
        TRAINING_REQUIRED | {"reward_function"},
        grpo.__doc__,
        distributed=True,
    ),
    "ppo": Command(
        "PPO: sample, score with a reward model or function, KL-penalised GAE, clipped updates",
        ppo.PPOConfig,
        ppo.main,
        TRAINING_REQUIRED,
        ppo.__doc__,
        distributed=True,
    ),
    "constitutional": Command(
        "self-critique and revision against written principles: SFT and preference data out",
        constitutional.ConstitutionalConfig,
        constitutional.main,
        constitutional.REQUIRED,
        constitutional.__doc__,
    ),
    # ----
    "compare": Command(
        "fine-tune one small model on one task with every method; tabulate cost and loss",
        compare.CompareConfig,
        compare.main,
    ),
    "merge": Command(
        "merge a LoRA or IA3 adapter into its base model",
        merge.MergeConfig,
        lambda config: f"merged model and tokenizer written to {merge.run(config)}",
        merge.REQUIRED,
        "merge a LoRA or IA3 adapter into its base model; write a plain Hugging Face model "
        "directory (+ tokenizer). A QLoRA adapter merges into the dense base checkpoint it was "
        "trained from (its base_model_name_or_path), not into NF4 weights.",
    ),
    "convert": Command(
        "convert a GGUF model file to a Hugging Face model directory (safetensors + tokenizer)",
        convert.ConvertConfig,
        convert.main,
        convert.REQUIRED,
        convert.__doc__,
    ),
    "info": Command("print how lorakit was built", InfoConfig, _info),
}
