"""`lorakit dpo`: completion log-probs equal a plain log_softmax + gather; the objective equals
the DPO formula on them (TRL's own loss code is compared in test_losses.py); the reference is
the base with adapters off;
PEFT loads the adapter with the same logits; exact resume; precomputed reference reuse."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from data_files import write_jsonl
from lorakit import LoraConfig, apply_lora
from lorakit.data import IGNORE, DataConfig, collate_pairs, prepare_preferences
from lorakit.models import ModelConfig, load_model, load_tokenizer
from lorakit.recipes import dpo
from lorakit.train import TrainConfig, Trainer
from lorakit.train.objectives.dpo import ADAPTERS_OFF, DPOObjective, completion_logps
from preference_helpers import pair_rows
from sft_helpers import saved_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_rows(16))


def config(base, data, out, method: str = "lora", **options) -> dpo.DPOConfig:
    train = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False}
    loss = {k: options.pop(k) for k in list(options) if k in ("precompute_ref", "loss_type")}
    return dpo.DPOConfig(
        model=ModelConfig(model=str(base), method=method, device="cpu"),
        data=DataConfig(data=[str(data)], val_fraction=0.25),
        train=TrainConfig(out=str(out), **{**train, **options}),
        dpo=dpo.DPOOptions(**loss),
    )


def batch_of(base, data, n: int = 6) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(ModelConfig(model=str(base)))
    cfg = DataConfig(data=[str(data)], val_fraction=0.0)
    return collate_pairs(prepare_preferences(cfg, tokenizer).train[:n], tokenizer.pad_token_id)


def reference_logps(model, batch) -> torch.Tensor:
    """Plain float64: log_softmax of the full logits, gathered at the completion tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = F.log_softmax(logits.double()[:, :-1], -1)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


@pytest.mark.parametrize("head_adapted", [False, True])
def test_completion_logps_equal_log_softmax_and_gather(base, data, head_adapted) -> None:
    model = load_model(ModelConfig(model=str(base), device="cpu")).eval()
    # An adapted LM head is no plain linear: the logits path runs instead of the hidden one.
    targets = ["q_proj", "lm_head"] if head_adapted else ["q_proj"]
    apply_lora(model, LoraConfig(r=2, target_modules=targets))
    for layer in model.modules():
        for b in getattr(layer, "lora_B", {}).values():
            torch.nn.init.normal_(b, std=0.5)
    batch = batch_of(base, data)
    got = completion_logps(model, batch)
    # float32 logits and softmax against float64: a few ulps of the sums' size.
    torch.testing.assert_close(got.double(), reference_logps(model, batch), rtol=1e-5, atol=1e-5)


def test_objective_equals_the_dpo_formula_on_plain_float64_log_probs(base, data) -> None:
    model = load_model(ModelConfig(model=str(base), device="cpu")).eval()
    batch = batch_of(base, data)
    reference = reference_logps(model, batch)  # the base, before the adapter
    apply_lora(model, LoraConfig(r=2))
    for layer in model.modules():
        for b in getattr(layer, "lora_B", {}).values():
            torch.nn.init.normal_(b, std=0.5)
    policy = reference_logps(model, batch)
    pairs = batch["margin"].shape[0]
    delta = (policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:])
    # Rafailov et al. 2023, eq. 7, with beta 0.1; the reference comes from disabling the adapter.
    expected = -F.logsigmoid(0.1 * delta).mean()
    ours = DPOObjective(ADAPTERS_OFF, beta=0.1)(model, batch)
    # float32 log-probs (sums of ~10 terms of size ~5) against float64: ~1e-6 relative.
    assert ours.loss_sum.item() / ours.count == pytest.approx(expected.item(), rel=1e-5)
    assert ours.metrics["reward_accuracy"] == float((delta > 0).sum())


def test_trains_and_peft_loads_the_adapter_with_the_same_logits(base, data, tmp_path) -> None:
    result = dpo.run(config(base, data, tmp_path / "run", max_steps=12))
    history = [json.loads(line) for line in result.train.metrics.read_text().splitlines()]
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]
    assert history[-1]["loss"] < history[0]["loss"]
    ids = batch_of(base, data)["input_ids"]
    with torch.no_grad():
        ours = result.model.eval()(input_ids=ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(base)
        theirs = peft.PeftModel.from_pretrained(plain, result.saved).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "precompute"), [("qlora", False), ("full", True)])
def test_resumed_run_repeats_the_uninterrupted_losses(
    base, data, tmp_path, monkeypatch, method, precompute
) -> None:
    options = {"max_steps": 6, "save_every": 2, "precompute_ref": precompute}
    dpo.run(config(base, data, tmp_path / "whole", method, **options))
    original = Trainer._step

    def crash_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(config(base, data, tmp_path / "cut", method, **options))
    monkeypatch.setattr(Trainer, "_step", original)
    stored = tmp_path / "cut" / dpo.REFERENCE_FILE
    written = stored.stat().st_mtime_ns if precompute else None
    dpo.run(config(base, data, tmp_path / "cut", method, **options))
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    if precompute:  # the resumed run read the stored reference log-probs back
        assert stored.stat().st_mtime_ns == written


@pytest.mark.parametrize("precompute", [False, True])
def test_a_resume_on_other_pairs_is_refused(base, tmp_path, precompute) -> None:
    # With the reference precomputed the Trainer's rows are indices into the pairs: the pairs,
    # not the indices, must be what the checkpoint remembers.
    rows = pair_rows(16)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    options = {"max_steps": 2, "save_every": 2, "precompute_ref": precompute}
    dpo.run(config(base, data, tmp_path / "out", **options))
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    write_jsonl(tmp_path / "pairs.jsonl", swapped)  # as many pairs, each the other way round
    with pytest.raises(ValueError, match="checkpoint-2 was trained on other rows"):
        dpo.run(config(base, data, tmp_path / "out", **options))


def test_precomputed_reference_equals_the_per_step_reference(base, data, tmp_path) -> None:
    on_the_fly = dpo.run(config(base, data, tmp_path / "a", max_steps=3))
    stored = dpo.run(config(base, data, tmp_path / "b", max_steps=3, precompute_ref=True))
    # The same reference (the base with the adapter off), once per step or once in advance.
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-6)
    assert on_the_fly.train.steps == stored.train.steps == 3
