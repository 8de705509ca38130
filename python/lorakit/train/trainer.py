"""The step engine every recipe trains with: handed an objective and batches, it runs
accumulation, ``no_sync``, AdamW, the schedule, clipping, evaluation, checkpoints and resume,
metrics and the progress bar, without knowing the loss or the data's shape."""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lorakit.optim import AdamW
from lorakit.optim.state import local_shard
from lorakit.train import checkpoint, distributed, fsdp, out_dir, precision, sharded_checkpoint
from lorakit.train.batches import Batch, RowBatches
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import MetricsLog, peak_memory_mib, plot_metrics, read, rewrite
from lorakit.train.objective import Objective
from lorakit.train.resume_check import (
    check_resume,
    data_digest,
    option_defaults,
    stored_options,
)
from lorakit.train.schedule import scheduler

# torch 2.14 renamed DDP's broadcast_buffers (the old name now warns); the lent GPU machines
# build lorakit against their own torch 2.11 (BUILD-NOTES), which has only the old name.
_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns); the lent GPU
    # machines' own transformers may predate that.
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing to enable")
    # Non-reentrant checkpointing works when the inputs need no gradient (frozen embeddings
    # under LoRA); the reentrant kind would silently drop the adapters' gradients.
    enable({"use_reentrant": False})


def trainable_optimizer(
    model: nn.Module, config: TrainConfig, groups: list[dict[str, Any]] | None = None
) -> AdamW:
    """:class:`lorakit.optim.AdamW` over ``model``'s parameters that require a gradient (or the
    parameter ``groups`` given, each with its own options such as ``lr``), with ``config``'s
    rate, decay, state precision, clipping and paging.

    Raises:
        ValueError: no parameter trains.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return AdamW(
        groups or params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        state_bits=config.optim_bits,
        max_grad_norm=config.max_grad_norm or None,
        paged=config.optim_page_budget_mb > 0,
        page_budget_mb=config.optim_page_budget_mb or math.inf,
    )


@dataclass(frozen=True)
class TrainResult:
    steps: int
    last_loss: float
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    peak_memory_mib: float
    metrics: Path
    plot: Path


class Trainer:
    """Trains ``model``'s trainable parameters on ``objective`` with :class:`lorakit.optim.AdamW`.

    Optimizer step ``s`` uses micro-batches ``s * grad_accum`` to ``s * grad_accum + grad_accum -
    1`` of ``train`` (:meth:`RowBatches.shuffled`), so the data position is the step and a resumed
    run sees exactly the batches the uninterrupted run would have. The step's loss is the sum of
    the objective's losses over all its micro-batches divided by their item count (tokens,
    pairs), so accumulation equals one large batch.

    Under torchrun (``N`` ranks in a process group, see :mod:`lorakit.train.distributed`) the
    model is wrapped in ``DistributedDataParallel``, or with ``config.fsdp`` sharded in place
    with FSDP2 (:mod:`lorakit.train.fsdp`; checkpoints then written by every rank, see
    :mod:`lorakit.train.sharded_checkpoint`), and a step takes ``N * grad_accum``
    micro-batches, rank ``r`` computing those from ``(s * N + r) * grad_accum`` on: ``N``
    processes with ``grad_accum`` k train as one with ``N * k``, up to float summation order.
    Every rank evaluates its share of the validation batches and the sums are reduced, so all
    ranks see the same validation loss and stop together. Rank 0 alone writes checkpoints,
    metrics and the plot, and shows the progress bar.

    Args:
        model: the model the objective calls; only parameters with ``requires_grad`` train.
        config: the loop's options.
        objective: the loss and metrics of a batch (:class:`~lorakit.train.objective.Objective`).
        train: training batches.
        val: validation batches; may be empty (no evaluation, no early stopping).
        run_config: every option of the run, a dataclass (a recipe's config; default
            ``config``), stored in each checkpoint: a resume with other options is refused
            (see :func:`lorakit.train.resume_check.check_resume`).
        rows_digest: the :func:`~lorakit.train.resume_check.data_digest` of the data the
            batches come from, also stored and compared on resume; default: of ``train``'s and
            ``val``'s rows (give it where those are indices into the data).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        objective: Objective,
        train: RowBatches[Any],
        val: RowBatches[Any] | None = None,
        run_config: Any = None,
        rows_digest: str | None = None,
    ) -> None:
        if not train.rows:
            raise ValueError("no training rows")
        self.model, self.config, self.objective = model, config, objective
        options = config if run_config is None else run_config
        self.run_config = stored_options(options)
        self.option_defaults = option_defaults(options)
        self.train_batches = train
        self.val_batches = val if val is not None and val.rows else None
        self.data_digest = rows_digest or data_digest(
            train.rows, self.val_batches.rows if self.val_batches else []
        )
        self.out = Path(config.out)
        self.device = next(model.parameters()).device
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
        self.fsdp = config.fsdp and self.world > 1
        if self.fsdp:  # before the optimizer: sharding replaces the parameters
            fsdp.shard(model, self.device)
        self.optimizer = trainable_optimizer(model, config)
        accum = config.grad_accum * self.world  # micro-batches per step, over all ranks
        micro = config.max_steps * accum or math.ceil(config.epochs * len(train))
        self.total_steps = max(1, math.ceil(micro / accum))
        self.scheduler = scheduler(self.optimizer, config.schedule, self.total_steps, config.warmup)
        self.ddp = self._wrap() if self.world > 1 and not self.fsdp else None

    def _wrap(self) -> DistributedDataParallel:
        # Buffers (rotary tables) never change in training, so they are not re-sent every
        # forward; every trainable parameter takes part in every forward, so no unused-parameter
        # search. Frozen parameters get no gradient and are never all-reduced.
        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=False,
            **{_SYNC_BUFFERS: False},
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision.autocast(self.config.autocast, self.device)

    def _on_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        # DDP all-reduces gradients in the backward pass; once per step (the last micro-batch)
        # is enough, the earlier ones only accumulate locally. FSDP likewise reduce-scatters them.
        if self.fsdp:
            fsdp.set_gradient_sync(self.model, last)
            return contextlib.nullcontext()
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _step(self, step: int) -> tuple[dict[str, float], int]:
        """One optimizer step; returns the loss and the objective's metrics, each a mean per
        counted item over every rank, and the tokens seen by every rank."""
        k = self.config.grad_accum
        first = (step * self.world + self.rank) * k
        batches = [self._on_device(self.train_batches.shuffled(m)) for m in range(first, first + k)]
        mine = sum(self.objective.count(b) for b in batches)
        (counted,) = distributed.sum_across([float(mine)])
        sums: dict[str, float] = {"loss": 0.0}
        for i, batch in enumerate(batches):
            with self._no_sync(last=i == k - 1):
                with self._autocast():
                    out = self.objective(self.model if self.ddp is None else self.ddp, batch)
                # The step's loss is the mean over every rank's counted items. DDP and FSDP
                # average the ranks' gradients, so each rank scales by the world size to make
                # that a sum.
                (out.loss_sum * self.world / max(1.0, counted)).backward()
            sums["loss"] += out.loss_sum.item()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        seen = sum(self.objective.tokens(b) for b in batches)
        *totals, all_seen = distributed.sum_across([*sums.values(), float(seen)])
        means = {name: total / max(1.0, counted) for name, total in zip(sums, totals, strict=True)}
        if not math.isfinite(means["loss"]):  # every rank sees the same sum: all stop together
            raise self._diverged(step, f"the loss is {means['loss']}")
        try:
            self.optimizer.step()
        except FloatingPointError:  # a non-finite gradient norm; nothing was updated
            raise self._diverged(step, f"the gradient norm is {self.optimizer.grad_norm}") from None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.objective.summarize(means), int(all_seen)

    def _diverged(self, step: int, why: str) -> Diverged:
        return Diverged(
            f"training diverged at step {step + 1}: {why}; no checkpoint of it was written, "
            f"{last_checkpoint(self.out)} (try a lower --lr or --max-grad-norm, or check the "
            "data)"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss and the objective's metrics over the validation rows, each a mean per
        counted item (each rank computes every ``world_size``-th batch; the sums are reduced,
        so every rank returns the same)."""
        if self.val_batches is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {"loss": 0.0}
        count = 0
        n_batches = len(self.val_batches)
        # Under FSDP every forward all-gathers, so every rank runs as many: a rank short of a
        # batch computes batch 0 again and discards it.
        mine = range(n_batches)[self.rank :: self.world]
        rounds = -(-n_batches // self.world) if self.fsdp else len(mine)
        for j in range(rounds):
            i = mine[j] if j < len(mine) else 0
            with self._autocast():
                out = self.objective(self.model, self._on_device(self.val_batches.in_order(i)))
            if j >= len(mine):
                continue
            sums["loss"] += float(out.loss_sum)
            count += out.count
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        self.model.train(was_training)
        # Every rank reduces the same names: an objective reports the same metrics for every
        # batch, and a rank without batches sums its zeros under the names of rank 0's.
        names = distributed.broadcast_from_main(list(sums))
        *totals, all_count = distributed.sum_across([sums.get(n, 0.0) for n in names] + [count])
        means = {n: t / max(1.0, all_count) for n, t in zip(names, totals, strict=True)}
        return self.objective.summarize(means)

    def _resume(self, log_path: Path) -> dict[str, Any]:
        path = checkpoint.latest(self.out) if self.config.resume else None
        if path is None:
            if self.main:  # another run's records and checkpoints are not this run's
                log_path.unlink(missing_ok=True)
                checkpoint.remove_all(self.out)
            return {"step": 0, "best_val": None, "bad_evals": 0}
        stored = checkpoint.read_state(path)
        check_resume(
            path, stored, self.run_config, self.option_defaults, self.world, self.data_digest
        )
        if self.fsdp:
            sharded_checkpoint.load(path, self.model, self.optimizer)
            checkpoint.load_rng(path, self.rank)
            state = checkpoint.read_state(path)
        else:
            state = checkpoint.load(path, self.model, self.optimizer, self.rank)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.main and log_path.exists():  # records after the checkpoint: steps run again
            rewrite(log_path, [r for r in read(log_path) if r["step"] <= state["step"]])
        return state

    def _save(self, step: int, state: dict[str, Any]) -> None:
        # Without clipping no gradient norm is computed, so a NaN gradient with a finite loss
        # reaches the parameters unseen; it must not reach a checkpoint. The ranks' counts are
        # summed (under FSDP each holds a shard), so all stop together.
        trained = (p for group in self.optimizer.param_groups for p in group["params"])
        bad = sum(int((~torch.isfinite(local_shard(p))).sum()) for p in trained)
        if distributed.sum_across([float(bad)])[0]:
            raise self._diverged(step - 1, "a parameter is NaN or infinite after the update")
        state = {
            **state,
            "step": step,
            "micro_batch": step * self.config.grad_accum * self.world,
            "world_size": self.world,
            "scheduler": self.scheduler.state_dict(),
            "config": self.run_config,
            "data": self.data_digest,
        }
        rng = distributed.gather_to_main(checkpoint.rng_state())
        if self.fsdp:
            tmp = distributed.broadcast_from_main(
                str(checkpoint.staging_dir(self.out)) if self.main else None
            )
            with checkpoint.removed_on_failure(Path(tmp), checkpoint.folder(self.out, step)):
                sharded_checkpoint.save(Path(tmp), self.model, self.optimizer)
            distributed.barrier()  # every rank's part is written before it is published
            if self.main:
                checkpoint.publish(
                    self.out, Path(tmp), step, state, self.config.keep_checkpoints, rng
                )
        elif self.main:
            checkpoint.save(
                self.out, step, self.model, self.optimizer, state, self.config.keep_checkpoints, rng
            )
        # When fit returns on any rank, its last checkpoint is complete.
        distributed.barrier()

    def fit(self) -> TrainResult:
        """Runs (or resumes) training to the end or an early stop; writes ``metrics.jsonl``,
        ``loss.png`` and checkpoints under ``config.out`` (rank 0 only; under FSDP every rank
        writes its part of each checkpoint), holding its lock
        (:mod:`lorakit.train.out_dir`).

        Raises:
            Diverged: the loss or the gradient norm is not finite (NaN / Inf).
            Interrupted: Ctrl-C (the message says where the last checkpoint is).
            ValueError: ``config.out`` is in use by another run, or its checkpoint is corrupt
                or was trained with other options.
        """
        with out_dir.claim(self.out):
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.config
        log_path = self.out / "metrics.jsonl"
        state = self._resume(log_path)
        start = state["step"]
        log = MetricsLog(log_path, cfg.report_to, start) if self.main else None
        self.model.train()
        started = time.perf_counter()
        loss, stopped, done = state.get("loss", math.nan), False, start
        bar = tqdm(
            range(start, self.total_steps),
            initial=start,
            total=self.total_steps,
            desc="training",
            disable=not (cfg.progress and self.main),
            dynamic_ncols=True,
        )
        try:
            for step in bar:
                tic = time.perf_counter()
                means, tokens = self._step(step)
                loss = means["loss"]
                done = step + 1
                record: dict[str, Any] = {"step": done, **means}
                record["lr"] = self.scheduler.get_last_lr()[0]
                if self.optimizer.grad_norm is not None:  # computed where clipping is on
                    record["grad_norm"] = self.optimizer.grad_norm
                record["tokens_per_s"] = tokens / (time.perf_counter() - tic)
                record["memory_mib"] = peak_memory_mib(self.device)
                last = done == self.total_steps
                if self.val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
                    scores = self.evaluate()
                    record.update({f"val_{name}": value for name, value in scores.items()})
                    val = scores["loss"]
                    if state["best_val"] is None or val < state["best_val"]:
                        state["best_val"], state["bad_evals"] = val, 0
                    else:
                        state["bad_evals"] += 1
                    stopped = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
                logged = done % cfg.log_every == 0 or last or stopped or "val_loss" in record
                if log is not None and logged:
                    log.write(record)
                bar.set_postfix(_postfix(record, means))
                if last or stopped or (cfg.save_every and done % cfg.save_every == 0):
                    self._save(done, {**state, "loss": loss})
                if stopped:
                    break
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted after step {done} of {self.total_steps}; {last_checkpoint(self.out)}"
            ) from None
        finally:
            bar.close()
            if log is not None:
                log.close()
        plot = self.out / "loss.png"
        if self.main:
            plot_metrics(read(log_path), plot)
        return TrainResult(
            steps=done,
            last_loss=loss,
            best_val_loss=state["best_val"],
            stopped_early=stopped,
            seconds=time.perf_counter() - started,
            peak_memory_mib=peak_memory_mib(self.device),
            metrics=log_path,
            plot=plot,
        )


class Diverged(ValueError):
    """The loss or the gradient norm became NaN or infinite; the model was not updated."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message says where the last checkpoint is."""


def last_checkpoint(out: Path) -> str:
    """Where a stopped run can resume from, as one clause of its message."""
    path = checkpoint.latest(out)
    if path is None:
        return f"no checkpoint in {out} yet (--save-every N writes one every N steps)"
    return f"the last checkpoint is {path} (a rerun of the same command resumes from it)"


def _postfix(record: dict[str, Any], means: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields: every mean the objective reported, then rate and memory."""
    shown = {name: f"{value:.3f}" for name, value in means.items()}
    shown["lr"] = f"{record['lr']:.2e}"
    shown["tok_s"] = f"{record['tokens_per_s']:.0f}"
    shown["mem"] = f"{record['memory_mib']:.0f}MiB"
    return shown
