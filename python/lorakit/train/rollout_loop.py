"""What the rollout loops (GRPO, PPO) share: the prompts of a step, sampling and scoring with the
NaN guard, token-weighted step metrics, checkpoints that resume exactly, and the loop with its
progress bar, metrics file, KL warnings and plot.

A subclass implements :meth:`RolloutLoop._step` (one rollout and its updates, returning the
step's metrics) and, when it keeps more state than the trained parameters, the optimizer, the
schedule and the RNG, :meth:`RolloutLoop.extra_state` / :meth:`RolloutLoop.load_extra_state`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from lorakit.data.prompts import Prompt
from lorakit.generation import NonFiniteLogits, Rollout, SamplingOptions, sample
from lorakit.models.modes import evaluating
from lorakit.models.positions import check_generation, position_limit
from lorakit.models.vocab import check_token_ids
from lorakit.optim import AdamW
from lorakit.train import checkpoint, distributed
from lorakit.train.batches import RowBatches
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import MetricsLog, peak_memory_mib, plot_metrics, read, rewrite
from lorakit.train.resume_check import (
    check_resume,
    data_digest,
    option_defaults,
    stored_options,
)
from lorakit.train.schedule import scheduler
from lorakit.train.trainer import Diverged, Interrupted, TrainResult, last_checkpoint
from lorakit.user_code import raised_in_user_code

RewardFunction = Callable[..., Sequence[float]]

# A mean per-token KL estimate below this (nats) is reported: k1 is an unbiased estimate of a
# non-negative quantity, so a clearly negative mean says the sampled tokens do not come from the
# policy the log-probs are computed with (e.g. top_p truncation).
NEGATIVE_KL = -0.01


@contextlib.contextmanager
def all_ranks_stop_together(error: type[Exception], where: str) -> Iterator[None]:
    """Under torchrun, an ``error`` raised in the block on some ranks stops every rank right
    after it (the others with a line pointing to it) instead of leaving them waiting in their
    next collective; the block must be entered by every rank."""
    failure: Exception | None = None
    try:
        yield
    except error as e:
        failure = e
    if distributed.sum_across([float(failure is not None)])[0]:
        raise failure or error(f"{where} failed in another process (see its error)")


def _rewards(values: Any, count: int) -> torch.Tensor:
    """A reward function's ``values`` as ``count`` float32 rewards.

    Raises:
        ValueError: ``values`` is not ``count`` numbers (a sequence, array or tensor of them).
    """
    expected = f"the reward function must return one number per completion ({count})"
    try:
        rewards = torch.as_tensor(list(values), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected}, got {type(values).__name__} {values!r:.80}") from None
    if rewards.shape != (count,):
        raise ValueError(f"{expected}, got shape {list(rewards.shape)}")
    return rewards


@dataclass
class StepSums:
    """Token-weighted sums of the update metrics over a step."""

    values: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor | float, tokens: float) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value) * tokens
        self.tokens[name] = self.tokens.get(name, 0.0) + tokens

    def means(self) -> dict[str, float]:
        """Each metric's token-weighted mean over every rank's sums."""
        names = sorted(self.values)
        totals = distributed.sum_across([self.values[k] for k in names])
        tokens = distributed.sum_across([self.tokens[k] for k in names])
        return {k: v / max(1.0, t) for k, v, t in zip(names, totals, tokens, strict=True)}


@dataclass(frozen=True)
class Scored:
    """A step's sampled completions and their rewards."""

    rollout: Rollout
    rewards: torch.Tensor
    """(rows,) float32, on the CPU."""
    metrics: dict[str, float]


class RolloutLoop:
    """The loop of an RL trainer that samples from ``model`` (an adapter on a frozen base).

    Args:
        model: the causal LM that samples (the policy).
        tokenizer: its tokenizer (prompts are encoded, completions decoded with it).
        config: ``batch_size`` is prompts per step, ``max_steps`` (or ``epochs`` over the
            prompts) the number of rollout steps.
        sampling: how completions are sampled.
        prompts: the prompt rows.
        reward: ``reward(prompts, completions, **columns) -> rewards``.
        optimizer: the optimizer of the trained parameters.
        updates_per_step: optimizer steps per rollout step (for the schedule's length).
        kl_warn: warn when a step's mean per-token KL to the reference exceeds this (nats).
        trained: the module whose trainable parameters checkpoints hold (default ``model``).
        run_config: every option of the run, a dataclass (a recipe's config; default:
            ``config`` as its ``train`` section), stored in checkpoints: a resume whose options
            differ is refused (:func:`lorakit.train.resume_check.check_resume`).

    Under torchrun each of the ``N`` processes takes its share of each step's prompts
    (``batch_size / N``), samples with its own random stream, scores, and sums its gradients
    with the others' before each optimizer step (a subclass scales its token-mean losses by
    :meth:`global_share` and calls :meth:`sync_gradients`); rank 0 writes the metrics (over
    every rank's completions) and the checkpoints (with every rank's RNG).
    """

    kind: ClassVar[str] = "rollout"
    # The curves of metrics.png (one panel each).
    plotted: ClassVar[tuple[str, ...]] = ("reward_mean", "kl")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        sampling: SamplingOptions,
        prompts: Sequence[Prompt],
        reward: RewardFunction,
        optimizer: AdamW,
        updates_per_step: int,
        kl_warn: float,
        trained: nn.Module | None = None,
        run_config: Any = None,
    ) -> None:
        world = distributed.world_size()
        if config.batch_size % world:
            raise ValueError(
                f"--batch-size {config.batch_size} must be a multiple of the {world} processes"
            )
        if config.grad_accum != 1:
            raise ValueError(f"{self.kind} takes --minibatches, not --grad-accum")
        if config.fsdp:
            raise ValueError(f"{self.kind} does not shard the model (--fsdp): drop the option")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if run_config is None:
            self.run_config = {"train": stored_options(config)}
            self.option_defaults = {f"train.{k}": v for k, v in option_defaults(config).items()}
        else:
            self.run_config = stored_options(run_config)
            self.option_defaults = option_defaults(run_config)
        self.sampling, self.reward, self.kl_warn = sampling, reward, kl_warn
        self.trained = model if trained is None else trained
        self.prompts = RowBatches(list(prompts), config.batch_size, list, config.seed)
        self.data_digest = data_digest(self.prompts.rows)
        self.out = Path(config.out)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None or self.pad_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token to sample completions")
        self._check_prompts(prompts)
        _check_reward_call(reward, list(prompts[0].columns) if prompts else [])
        self.optimizer = optimizer
        self.total_steps = max(1, config.max_steps or math.ceil(config.epochs * len(self.prompts)))
        updates = self.total_steps * updates_per_step
        self.scheduler = scheduler(self.optimizer, config.schedule, updates, config.warmup)

    def _check_prompts(self, prompts: Sequence[Prompt]) -> None:
        """Refuses, before any step, a prompt whose completion could run past the model's
        positions or that holds a token the model has no embedding for (``sample`` would fail
        only when its batch comes)."""
        if not prompts:
            return
        encoded = self.tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
        check_token_ids(self.model, encoded, {"pad": self.pad_id, "eos": self.eos_id})
        if position_limit(self.model) is not None:
            check_generation(self.model, max(map(len, encoded)), self.sampling.max_new_tokens)

    # ---- sampling and scoring

    def sample_and_score(self, step: int, per_prompt: int) -> Scored:
        """Samples ``per_prompt`` completions of each prompt of step ``step`` and scores them;
        prompt ``i``'s completions are rows ``[i * per_prompt, (i + 1) * per_prompt)``."""
        prompts: list[Prompt] = self.prompts.shuffled(step)
        share = len(prompts) // distributed.world_size()
        prompts = prompts[distributed.rank() * share :][:share]
        encoded = [self.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        tic = time.perf_counter()
        with all_ranks_stop_together(NonFiniteLogits, "sampling"):
            rollout = sample(
                self.model, encoded, per_prompt, self.sampling, self.pad_id, self.eos_id
            )
        seconds = time.perf_counter() - tic
        rewards = self._score(step, prompts, rollout, per_prompt)
        lengths = rollout.completion_mask.sum(1).float()
        # Every rank's completions on rank 0, which writes the metrics.
        every = torch.tensor(distributed.gather_to_main(rewards.tolist())).flatten()
        lengths_every = torch.tensor(distributed.gather_to_main(lengths.tolist())).flatten()
        ended = torch.tensor(distributed.gather_to_main(rollout.ended.tolist())).flatten()
        metrics = {
            "reward_mean": float(every.mean()),
            "reward_std": float(every.std()) if len(every) > 1 else 0.0,
            "completion_length": float(lengths_every.mean()),
            "ended_with_eos": float(ended.float().mean()),
            "rollout_s": seconds,
            "rollout_tokens_per_s": float(lengths_every.sum()) / seconds,
        }
        return Scored(rollout, rewards, metrics)

    def _score(
        self, step: int, prompts: list[Prompt], rollout: Rollout, per_prompt: int
    ) -> torch.Tensor:
        completions = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        raw = [p.raw for p in prompts for _ in range(per_prompt)]
        columns = {
            k: [p.columns[k] for p in prompts for _ in range(per_prompt)]
            for k in prompts[0].columns
        }
        with all_ranks_stop_together(ValueError, "the reward function"):
            try:
                values = self.reward(raw, completions, **columns)
            except Exception as e:  # the user's code: its error and where it arose, one line
                raise ValueError(
                    f"step {step + 1}: the reward function raised {raised_in_user_code(e)}; "
                    f"{self._stopped_before_update()}"
                ) from e
            rewards = _rewards(values, len(completions))
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        if distributed.sum_across([float(len(bad))])[0] and not bad:
            raise ValueError(
                f"step {step + 1}: the reward function returned a non-finite value in another "
                f"process; {self._stopped_before_update()}"
            )
        if bad:
            raise ValueError(
                f"step {step + 1}: the reward function returned {rewards[bad[0]].item()} for "
                f"completion {bad[0]} ({completions[bad[0]]!r}) and {len(bad) - 1} other(s); "
                f"{self._stopped_before_update()}"
            )
        return rewards

    def _stopped_before_update(self) -> str:
        return f"stopped before updating; {last_checkpoint(self.out)}"

    # ---- what a subclass provides

    def _step(self, step: int) -> dict[str, float]:
        """One rollout step (0-based): samples, scores, updates; returns its metrics."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """State beyond parameters, optimizer, schedule and RNG (JSON), saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""

    def options_state(self) -> dict[str, Any]:
        """The algorithm's options, recorded in checkpoints."""
        return {}

    def check_minibatches(self, minibatches: int, per_prompt: int) -> None:
        """Refuses more minibatches than the completions each process holds per step
        (``per_prompt`` completions for each of its prompts): a minibatch would be empty."""
        processes = distributed.world_size()
        rows = self.config.batch_size // processes * per_prompt
        if minibatches > rows:
            each = f" in each of the {processes} processes" if processes > 1 else ""
            raise ValueError(
                f"--minibatches {minibatches} is more than the {rows} completions of a step"
                f"{each}: lower --minibatches or raise --batch-size"
            )

    # ---- torchrun

    @staticmethod
    def global_share(tokens: torch.Tensor) -> float:
        """This rank's share of a minibatch's tokens over every rank's: a token-mean loss
        times it, its gradients summed over the ranks, is the token mean over all of them."""
        if not distributed.active():
            return 1.0
        return float(tokens) / distributed.sum_across([float(tokens)])[0]

    def sync_gradients(self) -> None:
        """Sums the trained parameters' gradients over the ranks (before the optimizer step)."""
        distributed.sum_gradients([p for p in self.trained.parameters() if p.requires_grad])

    def _diverging_as_one_line(self, step: int) -> dict[str, float]:
        """:meth:`_step`, with the two ways a diverged policy shows itself in one (logits that
        cannot be sampled from, a NaN gradient norm) stopping the run in one line."""
        try:
            return self._step(step)
        except NonFiniteLogits as e:
            why = f"{e} when sampling step {step + 1}'s completions"
        except FloatingPointError as e:  # lorakit.optim.AdamW: a non-finite gradient norm
            why = f"{e} in step {step + 1}"
        raise Diverged(
            f"training diverged: {why}; {last_checkpoint(self.out)} (try a lower --lr or "
            "--max-grad-norm)"
        )

    def _check_finite(self, step: int) -> None:
        """Stops the run when an update left a trained parameter NaN or infinite, before it
        reaches a checkpoint or the next rollout (every rank stops together)."""
        counts = [
            (~torch.isfinite(p.detach())).sum()
            for p in self.trained.parameters()
            if p.requires_grad
        ]
        bad = float(torch.stack(counts).sum()) if counts else 0.0  # one device sync
        if distributed.sum_across([bad])[0]:
            raise Diverged(
                f"training diverged at step {step + 1}: a trained parameter is NaN or infinite "
                f"after the update; no checkpoint of it was written, {last_checkpoint(self.out)} "
                "(try a lower --lr or --max-grad-norm)"
            )

    # ---- checkpoints

    def _resume(self, log_path: Path) -> int:
        path = checkpoint.latest(self.out) if self.config.resume else None
        if path is None:
            if distributed.is_main():  # another run's records and checkpoints are not this run's
                log_path.unlink(missing_ok=True)
                checkpoint.remove_all(self.out)
            return 0
        stored, current = checkpoint.read_state(path), self.run_config
        if "train" not in stored.get("config", {}):
            # Written before checkpoints held every option of the run, or the process count:
            # the loop's own options are compared, the process count cannot be.
            stored = {**stored, "config": {"train": stored.get("config", {})}}
            stored.setdefault("world_size", distributed.world_size())
            current = {"train": current["train"]}
        world = distributed.world_size()
        check_resume(path, stored, current, self.option_defaults, world, self.data_digest)
        state = checkpoint.load(path, self.trained, self.optimizer, distributed.rank())
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state.get("extra", {}))
        if distributed.is_main() and log_path.exists():
            # Records written after the checkpoint belong to steps that run again.
            rewrite(log_path, [r for r in read(log_path) if r["step"] <= state["step"]])
        return int(state["step"])

    def _save(self, step: int) -> None:
        state = {
            "step": step,
            "world_size": distributed.world_size(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.run_config,
            "data": self.data_digest,
            self.kind: self.options_state(),
            "extra": self.extra_state(),
        }
        trained = [p for p in self.trained.parameters() if p.requires_grad]
        if not distributed.same_on_every_rank([float(p.detach().double().sum()) for p in trained]):
            raise RuntimeError(f"step {step}: the processes' trained parameters differ")
        rng = distributed.gather_to_main(checkpoint.rng_state())
        if distributed.is_main():
            checkpoint.save(
                self.out,
                step,
                self.trained,
                self.optimizer,
                state,
                self.config.keep_checkpoints,
                rng,
            )
        distributed.barrier()

    # ---- the loop

    def _warn(self, step: int, metrics: dict[str, float]) -> None:
        kl = metrics.get("kl")
        if kl is None:
            return
        if kl > self.kl_warn:
            warnings.warn(
                f"step {step}: mean per-token KL to the reference is {kl:.3f} nats "
                f"(> kl_warn {self.kl_warn}); raise the KL coefficient or lower lr",
                stacklevel=1,
            )
        elif kl < NEGATIVE_KL:
            warnings.warn(
                f"step {step}: mean per-token KL estimate to the reference is {kl:.4f} nats "
                f"(< {NEGATIVE_KL}); the sampled tokens do not follow the policy's "
                "log-probs (top_p < 1?) or the estimate is noisy (use k3)",
                stacklevel=1,
            )

    def fit(self) -> TrainResult:
        """Runs (or resumes) to ``total_steps``; writes ``metrics.jsonl``, ``metrics.png`` and
        checkpoints under ``config.out``."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        main = distributed.is_main()
        start = self._resume(log_path)
        if start == 0 and distributed.active():
            # Each rank its own random stream (the adapters were initialised alike before).
            torch.manual_seed(cfg.seed + 1 + distributed.rank())
        log = MetricsLog(log_path, cfg.report_to, start) if main else None
        device = next(self.model.parameters()).device
        started, done, last_loss = time.perf_counter(), start, math.nan
        bar = tqdm(
            range(start, self.total_steps),
            initial=start,
            total=self.total_steps,
            desc=self.kind,
            disable=not (cfg.progress and main),
            dynamic_ncols=True,
        )
        try:
            with evaluating(self.trained):
                for step in bar:
                    metrics = self._diverging_as_one_line(step)
                    self._check_finite(step)
                    done, last_loss = step + 1, metrics["loss"]
                    record = {"step": done, **metrics, "lr": self.scheduler.get_last_lr()[0]}
                    record["memory_mib"] = peak_memory_mib(device)
                    if main:
                        self._warn(done, metrics)
                    last = done == self.total_steps
                    if log is not None and (done % cfg.log_every == 0 or last):
                        log.write(record)
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in self.plotted if k in record})
                    if last or (cfg.save_every and done % cfg.save_every == 0):
                        self._save(done)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted after step {done} of {self.total_steps}; {last_checkpoint(self.out)}"
            ) from None
        finally:
            bar.close()
            if log is not None:
                log.close()
        plot = self.out / "metrics.png"
        if main:
            records = read(log_path)
            rows = [{k: r[k] for k in ("step", *self.plotted) if k in r} for r in records]
            plot_metrics(rows, plot)
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


def _check_reward_call(reward: RewardFunction, columns: list[str]) -> None:
    """Raises ValueError, naming the call, if ``reward`` cannot take it: a one-line answer to a
    common mistake instead of a TypeError from deep inside the loop."""
    try:
        signature = inspect.signature(reward)
    except (TypeError, ValueError):
        return  # nothing to read it from (some builtins): the call itself will tell
    try:
        signature.bind([], [], **dict.fromkeys(columns))
    except TypeError as e:
        keywords = "".join(f", {c}=..." for c in columns)
        name = getattr(reward, "__name__", type(reward).__name__)
        raise ValueError(
            f"the reward function {name}{signature} cannot be called as "
            f"{name}(prompts, completions{keywords}) ({e}); the data's other columns come as "
            "keywords, which **columns accepts"
        ) from None
