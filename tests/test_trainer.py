"""The Trainer: learning, gradient accumulation, exact resume, early stopping, outputs."""

import dataclasses
import json
from functools import partial

import pytest
import torch

from lorakit import LoraConfig, PrefixTuningConfig, apply_lora, apply_prefix_tuning
from lorakit.data import Row, collate, encode, to_segments
from lorakit.train import RowBatches, TrainConfig, Trainer
from lorakit.train.checkpoint import LATEST
from lorakit.train.objectives import CausalLMObjective
from sft_helpers import llama, qa_rows, tokenizer

TOK = tokenizer()


def rows(data: list[dict[str, str]]) -> list[Row]:
    return [Row.of(encode(to_segments(r, "auto", TOK), TOK)) for r in data]


def model(lora_dropout: float | None = None):
    m = llama(TOK)
    if lora_dropout is not None:
        apply_lora(m, LoraConfig(r=4, dropout=lora_dropout))
    return m


def sft_trainer(m, cfg: TrainConfig, train: list[Row], val: list[Row], pad_id: int) -> Trainer:
    """The Trainer on next-token prediction over token rows, as ``lorakit sft`` builds it."""
    collate_rows = partial(collate, pad_id=pad_id)
    return Trainer(
        m,
        cfg,
        CausalLMObjective(pad_id),
        RowBatches(train, cfg.batch_size, collate_rows, cfg.seed),
        RowBatches(val, cfg.batch_size, collate_rows, cfg.seed),
    )


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def config(tmp_path, name: str, **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), progress=False, lr=1e-2, **kw)


def test_full_training_lowers_the_loss_and_writes_metrics_plot_and_checkpoint(tmp_path) -> None:
    cfg = config(tmp_path, "run", max_steps=30, batch_size=4, schedule="wsd")
    result = sft_trainer(model(), cfg, rows(qa_rows(12)), rows(qa_rows(4)), pad_id=0).fit()
    history = losses(tmp_path / "run")
    assert len(history) == result.steps == 30
    assert history[-1] < 0.5 * history[0]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens_per_s", "memory_mib", "val_loss"} <= set(record)
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / LATEST).read_text() == "checkpoint-30"
    assert not list((tmp_path / "run").glob(".checkpoint-tmp-*"))


def test_accumulating_two_half_batches_equals_one_batch(tmp_path) -> None:
    data = rows(qa_rows(16))
    whole, halves = model(), model()
    sft_trainer(whole, config(tmp_path, "a", max_steps=6, batch_size=4), data, [], 0).fit()
    accumulated = config(tmp_path, "b", max_steps=6, batch_size=2, grad_accum=2)
    sft_trainer(halves, accumulated, data, [], 0).fit()
    # Same rows per step and the same token-weighted mean; only float summation order differs.
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    for p, q in zip(whole.parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_killed_run_resumes_to_exactly_the_same_losses(tmp_path, monkeypatch) -> None:
    data = rows(qa_rows(20))
    # LoRA dropout draws random numbers every step: equality needs the RNG state restored too.
    cfg = dict(max_steps=10, batch_size=4, save_every=2, optim_bits=32)
    torch.manual_seed(1)
    sft_trainer(model(lora_dropout=0.1), config(tmp_path, "whole", **cfg), data, [], 0).fit()

    torch.manual_seed(1)
    crashing = sft_trainer(model(lora_dropout=0.1), config(tmp_path, "cut", **cfg), data, [], 0)
    original = Trainer._step

    def crash_at_step_7(self, step):
        if step == 6:  # after the checkpoint of step 6, before step 7 finishes
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.setattr(Trainer, "_step", original)
    assert len(losses(tmp_path / "cut")) == 6

    torch.manual_seed(99)  # a fresh process: other initial weights and RNG state
    resumed = sft_trainer(model(lora_dropout=0.1), config(tmp_path, "cut", **cfg), data, [], 0)
    result = resumed.fit()
    assert result.steps == 10
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_early_stopping_when_validation_loss_stops_improving(tmp_path) -> None:
    train = qa_rows(12)
    # The validation answers contradict the training ones: once the model has learnt the
    # format, fitting the training data makes the validation loss rise.
    val = [{**r, "completion": " three"} for r in train]
    cfg = config(tmp_path, "run", max_steps=200, batch_size=4, eval_every=2, patience=2)
    result = sft_trainer(model(), cfg, rows(train), rows(val), 0).fit()
    assert result.stopped_early
    assert result.steps < 200
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert min(val_losses) == result.best_val_loss
    assert val_losses[-1] > result.best_val_loss and val_losses[-2] > result.best_val_loss


def test_checkpoints_keep_only_the_latest(tmp_path) -> None:
    cfg = config(tmp_path, "run", max_steps=6, batch_size=4, save_every=1, keep_checkpoints=2)
    sft_trainer(model(), cfg, rows(qa_rows(8)), [], 0).fit()
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert kept == ["checkpoint-5", "checkpoint-6"]


# Full fine-tuning; LoRA with dropout and frozen embeddings (inputs need no grad); a prefix,
# which reaches each attention layer through the cache that checkpointed layers drop by default.
CHECKPOINTED_ADAPTERS = {
    "full": lambda m: None,
    "lora with dropout": lambda m: apply_lora(m, LoraConfig(r=4, dropout=0.1)),
    "prefix": lambda m: apply_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3)),
}


@pytest.mark.parametrize("adapter", CHECKPOINTED_ADAPTERS)
def test_gradient_checkpointing_gives_the_same_gradients_and_losses(tmp_path, adapter):
    data = rows(qa_rows(12))
    runs, calls = {}, []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        m = model()
        CHECKPOINTED_ADAPTERS[adapter](m)
        cfg = config(tmp_path, str(checkpointing), max_steps=4, batch_size=4)
        cfg = dataclasses.replace(cfg, gradient_checkpointing=checkpointing)
        trainer = sft_trainer(m, cfg, data, [], 0)
        calls.clear()
        # Inside the checkpointed layer (transformers checkpoints forward, outside the hooks).
        attention = m.model.layers[0].self_attn
        hook = attention.register_forward_hook(lambda *_: calls.append(1))
        m.train()
        loss_sum = trainer.objective(m, trainer.train_batches.shuffled(0)).loss_sum
        loss_sum.backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # the backward ran the layer again
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.fit()
        runs[checkpointing] = grads, losses(tmp_path / str(checkpointing)), list(m.parameters())
    # The recomputed forward repeats the same float operations (and, with its RNG state
    # restored, the same dropout masks), so the results agree to float32 rounding at most.
    (grads, history, params), (grads_ckpt, history_ckpt, params_ckpt) = runs[False], runs[True]
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7)
    assert history_ckpt == pytest.approx(history, rel=1e-6)
    for p, q in zip(params, params_ckpt, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("budget", "paged"), [(0.0, False), (64.0, True)])
def test_optimizer_pages_its_state_when_given_a_budget(tmp_path, budget, paged) -> None:
    cfg = config(tmp_path, "paged", max_steps=1, optim_page_budget_mb=budget)
    trainer = sft_trainer(model(), cfg, rows(qa_rows(4)), [], 0)
    assert trainer.optimizer.paged is paged
    if paged:
        assert trainer.optimizer.page_budget_mb == budget


def test_a_negative_page_budget_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="optim_page_budget_mb must be >= 0"):
        config(tmp_path, "x", max_steps=1, optim_page_budget_mb=-1)


def test_report_to_tensorboard_writes_the_same_scalars(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "run", max_steps=4, batch_size=4, report_to="tensorboard")
    sft_trainer(model(), cfg, rows(qa_rows(8)), rows(qa_rows(4)), 0).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "val_loss"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in logged[key]] == [s for s, _ in expected]
        # TensorBoard stores scalars as float32.
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in expected], rel=1e-6)
