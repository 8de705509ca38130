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
update's ratio is exactly 1. A checkpoint holds the adapter, the optimizer, the schedule and the
torch RNG (the sampling state) after step ``s``: a resumed run samples, scores and trains
exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lorakit.data.prompts import Prompt
from lorakit.generation import Rollout, SamplingOptions, sample
from lorakit.losses import AdvantageScale, Baseline, group_advantages, kl_penalty, ppo_policy_loss
from lorakit.losses.ppo import masked_mean
from lorakit.models.modes import evaluating
from lorakit.train import checkpoint, distributed
from lorakit.train.batches import RowBatches
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import MetricsLog, peak_memory_mib, plot_metrics, read
from lorakit.train.policy import completion_logprobs, reference_logprobs
from lorakit.train.schedule import scheduler
from lorakit.train.trainer import TrainResult, trainable_optimizer

RewardFunction = Callable[..., Sequence[float]]
# The curves plot_metrics draws for a rollout run (one panel each).
PLOTTED = ("reward_mean", "kl", "entropy", "completion_length", "clip_fraction")


@dataclass
class GRPOOptions:
    """GRPO's sampling group, advantages, clipping, KL and updates."""

    reward_function: str = field(
        default="",
        metadata={
            "help": "The verifiable reward, module:function or path/to/file.py:function, called "
            "as function(prompts, completions, **other_columns) -> one float per completion."
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


@dataclass
class _Sums:
    """Token-weighted sums of the update metrics over a step."""

    values: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, tokens: float) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value) * tokens
        self.tokens[name] = self.tokens.get(name, 0.0) + tokens

    def means(self) -> dict[str, float]:
        return {k: v / max(1.0, self.tokens[k]) for k, v in self.values.items()}


class GRPOTrainer:
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
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        options: GRPOOptions,
        sampling: SamplingOptions,
        prompts: Sequence[Prompt],
        reward: RewardFunction,
    ) -> None:
        if distributed.world_size() > 1:
            raise ValueError("GRPO runs in one process (torchrun is not supported yet)")
        if config.grad_accum != 1:
            raise ValueError("GRPO takes --minibatches, not --grad-accum")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.options, self.sampling, self.reward = options, sampling, reward
        self.prompts = RowBatches(list(prompts), config.batch_size, list, config.seed)
        self.out = Path(config.out)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None or self.pad_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token to sample completions")
        self.optimizer = trainable_optimizer(model, config)
        self.total_steps = max(1, config.max_steps or math.ceil(config.epochs * len(self.prompts)))
        updates = self.total_steps * options.updates * options.minibatches
        self.scheduler = scheduler(self.optimizer, config.schedule, updates, config.warmup)

    # ---- one step

    def _rollout(self, step: int) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        prompts: list[Prompt] = self.prompts.shuffled(step)
        encoded = [self.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        tic = time.perf_counter()
        rollout = sample(
            self.model, encoded, self.options.group_size, self.sampling, self.pad_id, self.eos_id
        )
        seconds = time.perf_counter() - tic
        rewards = self._score(step, prompts, rollout)
        lengths = rollout.completion_mask.sum(1).float()
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "completion_length": float(lengths.mean()),
            "ended_with_eos": float(rollout.ended.float().mean()),
            "rollout_s": seconds,
            "rollout_tokens_per_s": float(lengths.sum()) / seconds,
        }
        return rollout, rewards, metrics

    def _score(self, step: int, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        g = self.options.group_size
        completions = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        raw = [p.raw for p in prompts for _ in range(g)]
        columns = {k: [p.columns[k] for p in prompts for _ in range(g)] for k in prompts[0].columns}
        values = self.reward(raw, completions, **columns)
        rewards = torch.as_tensor(list(values), dtype=torch.float32)
        if rewards.shape != (len(completions),):
            raise ValueError(
                f"the reward function returned {rewards.numel()} values for "
                f"{len(completions)} completions"
            )
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        if bad:
            last = checkpoint.latest(self.out)
            raise ValueError(
                f"step {step + 1}: the reward function returned {rewards[bad[0]].item()} for "
                f"completion {bad[0]} ({completions[bad[0]]!r}) and {len(bad) - 1} other(s); "
                f"stopped before updating; last checkpoint: {last or 'none'}"
            )
        return rewards

    def _sampler_stats(
        self,
        logprobs: torch.Tensor,
        entropy: torch.Tensor | None,
        ref: torch.Tensor | None,
        mask: torch.Tensor,
        sums: _Sums,
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
        sums: _Sums,
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
        loss.backward()
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
        rollout, rewards, metrics = self._rollout(step)
        tic = time.perf_counter()
        device = rollout.input_ids.device
        groups = group_advantages(rewards, opts.group_size, opts.scale_rewards, opts.baseline)
        advantages = groups.advantages.to(device)
        args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
        temperature = self.sampling.temperature
        ref = reference_logprobs(self.model, *args, temperature) if opts.beta else None
        sums = _Sums()
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

    # ---- the loop

    def _resume(self, log_path: Path) -> int:
        path = checkpoint.latest(self.out) if self.config.resume else None
        if path is None:
            log_path.unlink(missing_ok=True)
            return 0
        state = checkpoint.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        # Records written after the checkpoint belong to steps that run again.
        kept = (
            [r for r in read(log_path) if r["step"] <= state["step"]] if log_path.exists() else []
        )
        log_path.write_text("".join(f"{json.dumps(r)}\n" for r in kept))
        return int(state["step"])

    def _save(self, step: int) -> None:
        state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
            "grpo": asdict(self.options),
        }
        checkpoint.save(
            self.out, step, self.model, self.optimizer, state, self.config.keep_checkpoints
        )

    def fit(self) -> TrainResult:
        """Runs (or resumes) GRPO to ``total_steps``; writes ``metrics.jsonl``, ``metrics.png``
        and checkpoints under ``config.out``."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        start = self._resume(log_path)
        log = MetricsLog(log_path, cfg.report_to, start)
        device = next(self.model.parameters()).device
        started, done, last_loss = time.perf_counter(), start, math.nan
        bar = tqdm(
            range(start, self.total_steps),
            initial=start,
            total=self.total_steps,
            desc="grpo",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        try:
            with evaluating(self.model):
                for step in bar:
                    metrics = self._step(step)
                    done, last_loss = step + 1, metrics["loss"]
                    record = {"step": done, **metrics, "lr": self.scheduler.get_last_lr()[0]}
                    record["memory_mib"] = peak_memory_mib(device)
                    kl = metrics.get("kl", 0.0)
                    if kl > self.options.kl_warn:
                        warnings.warn(
                            f"step {done}: mean per-token KL to the reference is {kl:.3f} nats "
                            f"(> kl_warn {self.options.kl_warn}); raise beta or lower lr",
                            stacklevel=1,
                        )
                    last = done == self.total_steps
                    if done % cfg.log_every == 0 or last:
                        log.write(record)
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in PLOTTED if k in record})
                    if last or (cfg.save_every and done % cfg.save_every == 0):
                        self._save(done)
        finally:
            bar.close()
            log.close()
        plot = self.out / "metrics.png"
        records = read(log_path)
        plot_metrics([{k: r[k] for k in ("step", *PLOTTED) if k in r} for r in records], plot)
        return TrainResult(
            steps=done,
            last_loss=last_loss,
            best_val_loss=None,
            stopped_early=False,
            seconds=time.perf_counter() - started,
            peak_memory_mib=peak_memory_mib(device),
            metrics=log_path,
            plot=plot,
        )
