"""`lorakit reward`: the reward model's loss equals TRL's RewardTrainer on the same weights and
batch; PEFT loads its adapter and transformers its merged model with the same scores; exact
resume; scoring (the tokenizer loaded once); user mistakes get one line."""

import json

import peft
import pytest
import torch
import transformers
from trl import RewardTrainer

from data_files import write_jsonl
from lorakit.cli import main
from lorakit.data import DataConfig, collate_pairs, prepare_preferences
from lorakit.models import ModelConfig, load_sequence_classifier, load_tokenizer
from lorakit.peft import save_adapter
from lorakit.recipes import reward
from lorakit.recipes.common import make_trainable
from lorakit.train import TrainConfig
from lorakit.train.objectives.reward import RewardObjective
from preference_helpers import pair_rows
from sft_helpers import saved_model
from trl_reference import _one_process


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("base") / "model")


def config(base, data, out, **train) -> reward.RewardConfig:
    options = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False, **train}
    return reward.RewardConfig(
        model=ModelConfig(model=str(base), method="lora", device="cpu"),
        data=DataConfig(data=[str(data)], val_fraction=0.0),
        train=TrainConfig(out=str(out), **options),
    )


def scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_loss_equals_trl_reward_trainer_on_the_same_weights_and_batch(base, tmp_path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6))
    cfg = config(base, data, tmp_path / "out")
    tokenizer = load_tokenizer(cfg.model)
    model = load_sequence_classifier(cfg.model, tokenizer.pad_token_id)
    make_trainable(model, cfg)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a head that separates the two sides
    pairs = prepare_preferences(cfg.data, tokenizer).train
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    batch["margin"] = torch.linspace(-0.5, 0.5, len(pairs))
    for center in (0.0, 0.01):
        ours = RewardObjective(center)(model, batch)
        trl = RewardTrainer.compute_loss(
            _one_process(model, args=type("A", (), {"center_rewards_coefficient": center})()),
            model,
            {k: batch[k] for k in ("input_ids", "attention_mask", "margin")},
        )
        # The same forward pass and formula; float32 summation order differs (sum vs mean).
        assert ours.loss_sum.item() / ours.count == pytest.approx(trl.item(), rel=1e-6)


def test_trained_adapter_loads_in_peft_and_merged_model_in_transformers(base, tmp_path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    cfg = config(base, data, tmp_path / "run", max_steps=20)
    result = reward.run(cfg)
    history = [json.loads(line) for line in result.train.metrics.read_text().splitlines()]
    assert history[-1]["accuracy"] == 1.0 and history[0]["accuracy"] < 1.0  # it learned
    adapter = result.saved
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]

    tokenizer = load_tokenizer(cfg.model)
    batch = collate_pairs(
        prepare_preferences(cfg.data, tokenizer).train[:8], tokenizer.pad_token_id
    )
    expected = scores(result.model.eval(), batch)

    plain = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    by_peft = peft.PeftModel.from_pretrained(plain, adapter).eval()
    torch.testing.assert_close(scores(by_peft, batch), expected, rtol=1e-5, atol=1e-5)

    out = tmp_path / "merged"
    argv = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert main(argv) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    # Merging adds B A into W in float32: the same products summed in another order.
    torch.testing.assert_close(scores(merged, batch), expected, rtol=1e-4, atol=1e-5)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(12)))
    argv = ["reward", "--score", "--model", str(base), "--adapter", str(adapter)]
    assert main([*argv, "--data", str(rows), "--out", str(tmp_path / "scored")]) == 0
    scored = [
        json.loads(x) for x in (tmp_path / "scored" / "scores.jsonl").read_text().split("\n") if x
    ]
    assert len(scored) == 12 and all(s["chosen_score"] > s["rejected_score"] for s in scored)
    # The merged directory scores as a reward model of its own (its score head is found).
    argv = ["reward", "--score", "--model", str(out), "--data", str(rows)]
    assert main([*argv, "--out", str(tmp_path / "scored_merged")]) == 0
    merged_scored = (tmp_path / "scored_merged" / "scores.jsonl").read_text().splitlines()
    for a, b in zip(scored, map(json.loads, merged_scored), strict=True):
        # As above: the merged weights round differently from base + adapter.
        assert b["chosen_score"] == pytest.approx(a["chosen_score"], rel=1e-4, abs=1e-5)
        assert b["rejected_score"] == pytest.approx(a["rejected_score"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("task", ["score", "train"])
def test_a_run_loads_the_tokenizer_once(base, tmp_path, monkeypatch, task) -> None:
    untrained = config(base, "", tmp_path / "unused")
    model, _ = reward.untrained(untrained, load_tokenizer(untrained.model))
    adapter = save_adapter(model, tmp_path / "adapter")
    loads = []
    load = transformers.AutoTokenizer.from_pretrained

    def counted(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted)
    if task == "score":
        rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": " b"}])
        argv = ["reward", "--score", "--model", str(base), "--adapter", str(adapter)]
    else:
        rows = write_jsonl(tmp_path / "rows.jsonl", pair_rows(4))
        argv = ["reward", "--model", str(base), "--max-steps", "1", "--no-progress"]
    assert main([*argv, "--data", str(rows), "--out", str(tmp_path / task)]) == 0
    assert len(loads) == 1


def test_resumed_run_repeats_the_uninterrupted_losses(base, tmp_path, monkeypatch) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    reward.run(config(base, data, tmp_path / "whole", max_steps=8, save_every=2))
    from lorakit.train import Trainer

    original = Trainer._step

    def crash_at_step_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        reward.run(config(base, data, tmp_path / "cut", max_steps=8, save_every=2))
    monkeypatch.setattr(Trainer, "_step", original)
    reward.run(config(base, data, tmp_path / "cut", max_steps=8, save_every=2))

    def losses(name: str) -> list[float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("cut") == losses("whole")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "question : what is one ?", "chosen": " two"}, "rejected"),
        ({"chosen": " two", "rejected": " three"}, "prompt"),
    ],
)
def test_bad_rows_get_one_line_naming_file_and_row(base, tmp_path, capsys, row, expected) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [*pair_rows(3), row])
    argv = ["reward", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "bad.jsonl" in err and "row 4" in err and expected in err
    )  # 0-based


def test_cli_mistakes_get_one_line(base, tmp_path, capsys) -> None:
    reward_cli = ["reward", "--no-progress", "--model", str(base)]  # stderr: the errors alone
    assert main([*reward_cli, "--data", str(tmp_path / "nope.jsonl")]) == 2
    wrong = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    assert main([*reward_cli, "--data", str(wrong)]) == 2
    assert main([*reward_cli, "--data", str(wrong), "--method", "ia3"]) == 2
    # A plain causal LM is no reward model: refused from its files, before it loads.
    assert main([*reward_cli, "--score", "--data", str(wrong)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("lorakit reward: error:") for line in lines)
    assert "ia3" in lines[2] and f"{base} has no trained 'score' head" in lines[3]
