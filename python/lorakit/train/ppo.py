r"""The PPO rollout loop of RLHF (Ziegler et al. 2019; Ouyang et al. 2022), as TRL's
experimental ``PPOTrainer`` runs it, with every role on one frozen base.

Each step ``s``:

1. takes prompt batch ``s`` and samples one completion per prompt from the policy;
2. scores each with the reward (a function, or a reward model); a completion without EOS loses
   ``missing_eos_penalty``;
3. without gradients: the policy's per-token log-probs and entropy, the reference's (adapters
   disabled) and the value model's values;
4. per-token rewards :math:`r_t = -\beta\, k(\pi, \pi_{ref})_t`, plus the score on the last
   completion token; GAE advantages and returns (:func:`lorakit.losses.gae`), advantages
   whitened over the batch (under torchrun, every process's rows);
5. ``updates`` passes over the rollout in ``minibatches`` parts, one optimizer step each, on

   .. math::

       \mathcal{L} = \mathcal{L}^{clip}_\pi + c_V\, \mathcal{L}^{clip}_V - c_H\, \bar H(\pi)

   (:func:`lorakit.losses.ppo_policy_loss`, :func:`lorakit.losses.ppo_value_loss`; the
   entropy bonus :math:`c_H` is ``entropy_coef``, 0 by default);
6. moves the KL coefficient :math:`\beta` (adaptive: :class:`lorakit.losses.AdaptiveKLController`,
   fed the mean per-sequence KL).

Roles: the policy is the LM's active adapter; the reference is the LM with adapters disabled;
the value model is adapter ``value`` on the LM's backbone plus a :class:`ValueHead`; a reward
model that shares the base is one more adapter (:class:`lorakit.models.heads.AdapterRewardModel`).
The policy's and the value's backward passes run one after the other: their parameters are
disjoint, so the gradients equal those of the summed loss, and only one forward pass's
activations exist at a time. Checkpoints add the value head and the KL coefficient to what
:class:`~lorakit.train.rollout_loop.RolloutLoop` saves, so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lorakit.data.prompts import Prompt
from lorakit.generation import Rollout, SamplingOptions
from lorakit.losses import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from lorakit.models.heads import ValueHead, token_values
from lorakit.peft import adapter_layers
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.policy import completion_logprobs, reference_logprobs
from lorakit.train.rollout_loop import RewardFunction, RolloutLoop, StepSums
from lorakit.train.trainer import trainable_optimizer
from lorakit.validate import check_number

VALUE_ADAPTER = "value"
PLOTTED = ("reward_mean", "kl", "entropy", "value_loss", "clip_fraction", "explained_variance")


@dataclass
class PPOOptions:
    """PPO's reward source, KL penalty, advantages, clipping and updates (defaults: TRL's
    experimental ``PPOConfig``)."""

    reward_function: str = field(
        default="",
        metadata={
            "path": True,
            "help": "A verifiable reward, module:function or path/to/file.py:function, called "
            "as function(prompts, completions, **other_columns) -> one float per completion.",
        },
    )
    reward_adapter: str = field(
        default="",
        metadata={
            "path": True,
            "help": "A reward adapter written by lorakit reward (LoRA + score head): loaded on "
            "the policy's base as one more named adapter, or on --reward-model when given.",
        },
    )
    reward_model: str = field(
        default="",
        metadata={
            "path": True,
            "help": "A reward model of its own (a sequence-classifier directory, e.g. written "
            "by lorakit merge or lorakit reward --method full), when it does not share the base.",
        },
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "KL penalty coefficient beta (the start value when adaptive)."},
    )
    kl_estimator: KLEstimator = field(
        default="k1",
        metadata={"help": "Per-token KL estimator in the reward: k1 (log ratio) or k3."},
    )
    kl_target: float = field(
        default=0.0,
        metadata={
            "help": "Adapt beta towards this KL per sequence (nats; Ziegler et al. 2019); "
            "0: beta stays fixed."
        },
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "The adaptive controller's horizon, in samples."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip the policy ratio to 1 +- this."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip the new values to the old ones +- this."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale the per-token rewards to unit variance."}
    )
    missing_eos_penalty: float = field(
        default=0.0,
        metadata={"help": "Subtract this from the score of a completion cut without EOS."},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "Subtract this times the policy's mean per-token entropy from the loss (an "
            "exploration bonus, OpenAI ppo2's ent_coef); 0: none, as in TRL's PPO."
        },
    )
    updates: int = field(
        default=4, metadata={"help": "Passes over each rollout batch (TRL's num_ppo_epochs)."}
    )
    minibatches: int = field(
        default=1,
        metadata={"help": "Optimizer steps per pass: the rollout batch is split in this many."},
    )
    value_init: Literal["auto", "reward", "zero"] = field(
        default="auto",
        metadata={
            "help": "Where the value adapter and head start: reward, a copy of --reward-adapter's "
            "on the policy's base (the value model starts as the reward model, as in TRL's PPO "
            "example); zero: V = 0; auto: reward when --reward-adapter shares the base, else zero."
        },
    )
    value_lr: float = field(
        default=0.0,
        metadata={"help": "Learning rate of the value adapter and head; 0: the same as --lr."},
    )
    kl_warn: float = field(
        default=1.0,
        metadata={"help": "Warn when the mean per-token KL to the reference exceeds this (nats)."},
    )

    def __post_init__(self) -> None:
        for name in (
            "kl_coef",
            "kl_target",
            "cliprange",
            "vf_coef",
            "cliprange_value",
            "missing_eos_penalty",
            "entropy_coef",
            "value_lr",
        ):
            check_number(name, getattr(self, name), low=0)
        check_number("gamma", self.gamma, low=0, high=1)
        check_number("lam", self.lam, low=0, high=1)
        if self.value_init not in ("auto", "reward", "zero"):
            raise ValueError(f"value_init must be auto, reward or zero, got {self.value_init!r}")
        if self.value_init == "reward" and (not self.reward_adapter or self.reward_model):
            raise ValueError(
                "--value-init reward copies a reward adapter on the policy's base: give "
                "--reward-adapter without --reward-model"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.updates < 1 or self.minibatches < 1 or self.kl_horizon < 1:
            raise ValueError("updates, minibatches and kl_horizon must be at least 1")


class PPOModules(nn.Module):
    """What a PPO checkpoint's trainable parameters are taken from: the LM (policy and value
    adapters) and the value head."""

    def __init__(self, model: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head


@dataclass(frozen=True)
class Advantages:
    """A rollout's training targets, (rows, completion_len) each."""

    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOTrainer(RolloutLoop):
    """Trains the policy adapter and the value model of ``model`` with PPO.

    Args:
        model: a causal LM whose active adapter is the policy (trainable) and which holds the
            value adapter ``value`` (trainable; :func:`lorakit.models.heads.add_value_adapter`).
        tokenizer: its tokenizer.
        config: the loop's options; ``batch_size`` is prompts (= completions) per step.
        options: PPO's options.
        sampling: how completions are sampled.
        prompts: the prompt rows.
        reward: ``reward(prompts, completions, **columns) -> scores``.
        value_head: the value head (hidden -> 1).
        run_config: every option of the run (see :class:`RolloutLoop`).
    """

    kind = "ppo"
    plotted = PLOTTED

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        options: PPOOptions,
        sampling: SamplingOptions,
        prompts: Sequence[Prompt],
        reward: RewardFunction,
        value_head: ValueHead,
        run_config: Any = None,
    ) -> None:
        self.options, self.value_head = options, value_head
        modules = PPOModules(model, value_head)
        value = {
            id(p)
            for _, layer in adapter_layers(model)
            if VALUE_ADAPTER in layer.settings
            for p in layer.adapter_parameters(VALUE_ADAPTER)
        }
        if not value:
            raise ValueError(f"the model has no adapter named {VALUE_ADAPTER!r} (the value model)")
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trained if id(p) not in value]},
            {
                "params": [p for p in trained if id(p) in value] + list(value_head.parameters()),
                "lr": options.value_lr or config.lr,
            },
        ]
        self.kl_control = (
            AdaptiveKLController(options.kl_coef, options.kl_target, options.kl_horizon)
            if options.kl_target > 0
            else FixedKLController(options.kl_coef)
        )
        super().__init__(
            model,
            tokenizer,
            config,
            sampling,
            prompts,
            reward,
            trainable_optimizer(modules, config, groups),
            options.updates * options.minibatches,
            options.kl_warn,
            trained=modules,
            run_config=run_config,
        )
        self.check_minibatches(options.minibatches, 1)

    def options_state(self) -> dict[str, Any]:
        return asdict(self.options)

    def extra_state(self) -> dict[str, Any]:
        return {"kl_control": self.kl_control.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_control.load_state_dict(state["kl_control"])

    # ---- one step

    def _values(self, ids: torch.Tensor, attention: torch.Tensor, n: int) -> torch.Tensor:
        return token_values(self.model, self.value_head, VALUE_ADAPTER, ids, attention, n)

    @torch.no_grad()
    def _targets(
        self, rollout: Rollout, scores: torch.Tensor, sums: StepSums
    ) -> tuple[Advantages, dict[str, float]]:
        """The sampling policy's log-probs, the values, the KL-penalised per-token rewards and
        GAE's whitened advantages and returns; the rollout's KL and entropy metrics."""
        opts = self.options
        args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
        mask = rollout.completion_mask.float()
        temperature = self.sampling.temperature
        logprobs, entropy = completion_logprobs(self.model, *args, temperature, True)
        ref = reference_logprobs(self.model, *args, temperature)
        values = self._values(rollout.input_ids, rollout.attention_mask, mask.shape[1]) * mask
        kl = kl_penalty(logprobs, ref, opts.kl_estimator) * mask
        beta = self.kl_control.value
        rewards = -beta * kl
        rows = torch.arange(len(mask), device=mask.device)
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards[rows, last] += scores
        # Batch statistics over every process's rows (under torchrun each holds a share).
        total = distributed.sum_tensor
        if opts.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, total=total) * mask
        advantages, returns = gae(rewards, values, mask, opts.gamma, opts.lam)
        advantages = whiten(advantages, mask, total=total) * mask
        tokens = float(mask.sum())
        sums.add("kl", masked_mean(kl, mask), tokens)
        sums.add("entropy", masked_mean(entropy, mask), tokens)
        row_count = total(torch.tensor(float(len(mask)), device=mask.device))
        sequence_kl = float(total(kl.sum()) / row_count)
        score = float(total(scores.sum()) / row_count)
        metrics = {
            "kl_sequence": sequence_kl,
            "kl_coef": beta,
            "score": score,
            "rlhf_reward": score - beta * sequence_kl,
            "value_mean": masked_mean(values, mask, total).item(),
            "explained_variance": float(explained_variance(values, returns, mask, total)),
        }
        return Advantages(logprobs, values, advantages, returns), metrics

    def _update(
        self, rollout: Rollout, targets: Advantages, rows: torch.Tensor, sums: StepSums
    ) -> None:
        """One optimizer step on ``rows`` of the rollout."""
        opts = self.options
        ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        mask = rollout.completion_mask[rows].float()
        logprobs, entropy = completion_logprobs(
            self.model,
            ids,
            attention,
            mask,
            self.sampling.temperature,
            with_entropy=opts.entropy_coef > 0,
            entropy_grad=True,
        )
        policy = ppo_policy_loss(
            logprobs,
            targets.logprobs[rows],
            targets.advantages[rows],
            mask,
            opts.cliprange,
            opts.cliprange,
        )
        loss = policy.loss
        if entropy is not None:
            loss = loss - opts.entropy_coef * masked_mean(entropy, mask)
        share = self.global_share(mask.sum())
        (loss * share).backward()
        values = self._values(ids, attention, mask.shape[1])
        value = ppo_value_loss(
            values, targets.values[rows], targets.returns[rows], mask, opts.cliprange_value
        )
        (opts.vf_coef * value.loss * share).backward()
        self.sync_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = float(mask.sum())
        sums.add("loss", loss.detach() + opts.vf_coef * value.loss.detach(), tokens)
        sums.add("policy_loss", policy.loss.detach(), tokens)
        sums.add("value_loss", value.loss.detach(), tokens)
        sums.add("value_clip_fraction", value.clip_fraction, tokens)
        for name in ("clip_fraction", "approx_kl", "ratio"):
            sums.add(name, getattr(policy, name), tokens)
        if self.optimizer.grad_norm is not None:
            sums.add("grad_norm", self.optimizer.grad_norm, 1.0)

    def _step(self, step: int) -> dict[str, float]:
        opts = self.options
        scored = self.sample_and_score(step, 1)
        rollout, metrics = scored.rollout, scored.metrics
        tic = time.perf_counter()
        device = rollout.input_ids.device
        scores = scored.rewards.to(device)
        scores = scores - opts.missing_eos_penalty * (~rollout.ended).to(scores.dtype)
        sums = StepSums()
        targets, rollout_metrics = self._targets(rollout, scores, sums)
        n = len(scores)
        for epoch in range(opts.updates):
            # A fixed minibatch order per (step, epoch), independent of the sampling RNG.
            seed = self.config.seed + 7919 * step + epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            for rows in order.to(device).tensor_split(opts.minibatches):
                self._update(rollout, targets, rows, sums)
        self.kl_control.update(rollout_metrics["kl_sequence"], self.config.batch_size)
        metrics.update(rollout_metrics)
        metrics.update(sums.means())
        metrics["train_s"] = time.perf_counter() - tic
        return metrics
