r"""The GRPO rollout loop: sample, score, normalise within groups, several clipped updates.

Each step ``s``:

1. takes prompt batch ``s`` (:meth:`RowBatches.shuffled`: the data position is the step);
2. samples ``G`` completions per prompt from the policy (:func:`lorakit.generation.sample`);
3. scores them with the reward function and turns rewards into group advantages
   (:func:`lorakit.losses.group_advantages`);
4. computes the reference's per-token log-probs (adapters disabled) when ``beta > 0``;
5. runs ``updates`` passes over the rollout in ``minibatches`` parts, one optimizer step each, on

   .. math::

       \mathcal{L} = \overline{-\min(\rho_t A, \mathrm{clip}(\rho_t, 1-\epsilon_{low},
       1+\epsilon_{high}) A)} + \beta\, \overline{k_3(\pi, \pi_{ref})_t}

   (token means over the minibatch: :func:`lorakit.losses.ppo_policy_loss`,
   :func:`lorakit.losses.kl_penalty`), the ratio against the policy that sampled (Shao et al.
   2024, "DeepSeekMath", eq. 3, with DAPO's token-level mean and separate epsilons).

The model runs without dropout throughout (as TRL's ``disable_dropout``), so that the first
update's ratio is exactly 1. The loop, checkpoints and exact resume are
:class:`lorakit.train.rollout_loop.RolloutLoop`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.data.prompts import Prompt
from lorakit.generation import Rollout, SamplingOptions
from lorakit.losses import AdvantageScale, Baseline, group_advantages, kl_penalty, ppo_policy_loss
from lorakit.losses.ppo import masked_mean
from lorakit.train import distributed as dist_helpers
from lorakit.train.config import TrainConfig
from lorakit.train.policy import completion_logprobs, reference_logprobs
from lorakit.train.rollout_loop import RewardFunction, RolloutLoop, StepSums
from lorakit.train.trainer import trainable_optimizer

__all__ = ["PLOTTED", "GRPOOptions", "GRPOTrainer", "RewardFunction"]
# The curves plot_metrics draws for a rollout run (one panel each).
PLOTTED = ("reward_mean", "kl", "entropy", "completion_length", "clip_fraction")


@dataclass
class GRPOOptions:
    """GRPO's sampling group, advantages, clipping, KL and updates."""

    reward_function: str = field(
        default="",
        metadata={
            "path": True,
            "help": "The verifiable reward, module:function or path/to/file.py:function, called "
            "as function(prompts, completions, **other_columns) -> one float per completion.",
        },
    )
    group_size: int = field(
        default=8, metadata={"help": "Completions sampled per prompt (G, at least 2)."}
    )
    beta: float = field(
        default=0.04,
        metadata={
            "help": "Weight of the k3 KL to the reference (the model with adapters disabled); "
            "0 skips the reference's forward pass."
        },
    )
    epsilon_low: float = field(
        default=0.2, metadata={"help": "Clip the probability ratio below at 1 - epsilon_low."}
    )
    epsilon_high: float = field(
        default=0.2,
        metadata={"help": "Clip the ratio above at 1 + epsilon_high (DAPO's clip-higher: 0.28)."},
    )
    scale_rewards: AdvantageScale = field(
        default="group",
        metadata={
            "help": "Divide advantages by the reward std of the group (GRPO), the batch, or "
            "none (Dr. GRPO)."
        },
    )
    baseline: Baseline = field(
        default="mean",
        metadata={"help": "Baseline: the group's mean (GRPO) or leave_one_out (RLOO)."},
    )
    updates: int = field(
        default=1, metadata={"help": "Passes over each rollout batch (PPO epochs; TRL's mu)."}
    )
    minibatches: int = field(
        default=1,
        metadata={"help": "Optimizer steps per pass: the rollout batch is split in this many."},
    )
    kl_warn: float = field(
        default=1.0,
        metadata={"help": "Warn when the mean per-token KL to the reference exceeds this (nats)."},
    )

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.updates < 1 or self.minibatches < 1:
            raise ValueError("updates and minibatches must be at least 1")


class GRPOTrainer(RolloutLoop):
    """Trains ``model``'s trainable parameters (an adapter on a frozen base) with GRPO.

    Args:
        model: a causal LM with adapters (the reference is the model with them disabled).
        tokenizer: its tokenizer (prompts are encoded, completions decoded with it).
        config: the loop's options; ``batch_size`` is prompts per step, ``max_steps`` (or
            ``epochs`` over the prompts) the number of rollout steps.
        options: GRPO's options.
        sampling: how completions are sampled.
        prompts: the prompt rows.
        reward: ``reward(prompts, completions, **columns) -> rewards``.
        run_config: every option of the run (see :class:`RolloutLoop`).
    """

    kind = "grpo"
    plotted = PLOTTED

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        options: GRPOOptions,
        sampling: SamplingOptions,
        prompts: Sequence[Prompt],
        reward: RewardFunction,
        run_config: Any = None,
    ) -> None:
        self.options = options
        if options.scale_rewards == "batch" and dist_helpers.world_size() > 1:
            raise ValueError("--scale-rewards batch is not supported under torchrun (use group)")
        super().__init__(
            model,
            tokenizer,
            config,
            sampling,
            prompts,
            reward,
            trainable_optimizer(model, config),
            options.updates * options.minibatches,
            options.kl_warn,
            run_config=run_config,
        )
        self.check_minibatches(options.minibatches, options.group_size)

    def options_state(self) -> dict[str, Any]:
        return asdict(self.options)

    def _sampler_stats(
        self,
        logprobs: torch.Tensor,
        entropy: torch.Tensor | None,
        ref: torch.Tensor | None,
        mask: torch.Tensor,
        sums: StepSums,
    ) -> None:
        """KL to the reference and entropy of the policy that sampled (before any update)."""
        tokens = float(mask.sum())
        if ref is not None:
            sums.add("kl", masked_mean(kl_penalty(logprobs.detach(), ref, "k3"), mask), tokens)
        if entropy is not None:
            sums.add("entropy", masked_mean(entropy, mask), tokens)

    def _update(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        ref: torch.Tensor | None,
        old: torch.Tensor | None,
        rows: torch.Tensor,
        sums: StepSums,
    ) -> None:
        """One optimizer step on ``rows`` of the rollout; ``old`` None: this pass is the
        sampling policy's own (one update of one minibatch), its statistics are measured here."""
        ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        mask = rollout.completion_mask[rows].float()
        logprobs, entropy = completion_logprobs(
            self.model, ids, attention, mask, self.sampling.temperature, with_entropy=old is None
        )
        ref_rows = None if ref is None else ref[rows]
        if old is None:
            self._sampler_stats(logprobs, entropy, ref_rows, mask, sums)
        policy = ppo_policy_loss(
            logprobs,
            logprobs.detach() if old is None else old[rows],
            advantages[rows],
            mask,
            self.options.epsilon_low,
            self.options.epsilon_high,
        )
        loss = policy.loss
        if ref_rows is not None:
            loss = loss + self.options.beta * masked_mean(kl_penalty(logprobs, ref_rows), mask)
        (loss * self.global_share(mask.sum())).backward()
        self.sync_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = float(mask.sum())
        sums.add("loss", loss.detach(), tokens)
        for name in ("clip_fraction", "clip_low_fraction", "clip_high_fraction", "approx_kl"):
            sums.add(name, getattr(policy, name), tokens)
        if self.optimizer.grad_norm is not None:
            sums.add("grad_norm", torch.tensor(self.optimizer.grad_norm), 1.0)

    def _step(self, step: int) -> dict[str, float]:
        opts = self.options
        scored = self.sample_and_score(step, opts.group_size)
        rollout, rewards, metrics = scored.rollout, scored.rewards, scored.metrics
        tic = time.perf_counter()
        device = rollout.input_ids.device
        groups = group_advantages(rewards, opts.group_size, opts.scale_rewards, opts.baseline)
        advantages = groups.advantages.to(device)
        args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
        temperature = self.sampling.temperature
        ref = reference_logprobs(self.model, *args, temperature) if opts.beta else None
        sums = StepSums()
        old = None
        if opts.updates > 1 or opts.minibatches > 1:  # later updates need the sampler's log-probs
            with torch.no_grad():
                old, entropy = completion_logprobs(self.model, *args, temperature, True)
            self._sampler_stats(old, entropy, ref, rollout.completion_mask.float(), sums)
        n = len(rewards)
        for epoch in range(opts.updates):
            # A fixed minibatch order per (step, epoch), independent of the sampling RNG.
            seed = self.config.seed + 7919 * step + epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            for rows in order.to(device).tensor_split(opts.minibatches):
                self._update(rollout, advantages, ref, old, rows, sums)
        metrics.update(sums.means())
        metrics["zero_std_fraction"] = float(groups.zero_std_fraction)
        metrics["train_s"] = time.perf_counter() - tic
        return metrics
