"""`lorakit ppo` end to end on a tiny Llama: with a verifiable reward (completions that contain
the word "five") the reward rises while the KL stays bounded; a resumed run repeats the
uninterrupted one (adaptive KL coefficient included); a NaN reward stops with a clear error;
policy, reference, value and reward share one copy of the base, and the reward adapter loaded
beside the policy scores as the reward model loaded on its own; the CLI runs it and reports
mistakes in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.cli import main
from lorakit.generation import SamplingOptions, sample
from lorakit.losses import masked_mean
from lorakit.models import ModelConfig, load_model, load_tokenizer
from lorakit.models.heads import token_values
from lorakit.peft import (
    active_adapter,
    adapter_layers,
    adapter_names,
    disable_adapters,
    save_adapter,
    using_adapter,
)
from lorakit.recipes import ppo, reward
from lorakit.recipes.grpo import prepare_policy as prepare_grpo_policy
from lorakit.train import TrainConfig
from lorakit.train.policy import completion_logprobs
from lorakit.train.ppo import PPOOptions, PPOTrainer
from lorakit.train.rollout_loop import StepSums
from rl_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    PROMPTS,
    assert_resume_repeats,
    cli_run_files,
    contains_target,
    nan_after,
    one_thread,
    policy,
    records,
)
from sft_helpers import saved_model


def config(out, steps: int, batch: int = 16, **options) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        model=ModelConfig(method="lora"),
        train=TrainConfig(
            out=str(out),
            max_steps=steps,
            batch_size=batch,
            lr=1e-2,
            schedule="constant",
            warmup=0.0,
            progress=False,
            save_every=2,
        ),
        ppo=PPOOptions(**{"updates": 2, **options}),
        sampling=SamplingOptions(max_new_tokens=4),
    )


def test_reward_rises_while_kl_stays_bounded(tmp_path) -> None:
    torch.manual_seed(0)
    model, tok = policy()
    result = ppo.train(model, tok, config(tmp_path, 12), PROMPTS * 4, contains_target)
    rows = records(tmp_path)
    assert len(rows) == 12 and result.saved.name == "adapter"
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    # Chance is about 4 tokens x 1/23 words = 0.17. Measured (seed 0): 0.23 over the first three
    # steps, 0.75 over the last three.
    assert first < 0.4 and last > first + 0.3, (first, last)
    assert rows[0]["kl"] == 0.0  # the first rollout's policy is the base (LoRA B = 0)
    # The k1 KL per token with kl_coef 0.05: measured at most 1.08 (step 7).
    assert all(-0.5 < r["kl"] < 3.0 for r in rows)
    for name in (
        "entropy",
        "clip_fraction",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "completion_length",
        "rollout_tokens_per_s",
        "rollout_s",
        "train_s",
        "reward_std",
        "kl_coef",
    ):
        assert all(name in r for r in rows), name
    assert (tmp_path / "metrics.png").is_file()
    # The saved adapter is the policy's alone (no value adapter, no head).
    saved = json.loads((result.saved / "adapter_config.json").read_text())
    assert saved["modules_to_save"] is None


def test_entropy_bonus_gradient_equals_the_float64_entropys() -> None:
    """--entropy-coef's term: the gradient of the completions' mean entropy, as the update takes
    it from completion_logprobs, equals that of the entropy formed in float64 from the same
    forward pass's logits, -sum p log p."""
    torch.manual_seed(0)
    model, tok = policy()
    prepare_grpo_policy(model, config("unused", 1))
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("one two", "question : a ?")]
    rollout = sample(model, prompts, 2, SamplingOptions(max_new_tokens=5), tok.pad_token_id, 2)
    ids, attention, completion = (
        rollout.input_ids,
        rollout.attention_mask,
        rollout.completion_mask.float(),
    )
    _, entropy = completion_logprobs(
        model, ids, attention, completion, with_entropy=True, entropy_grad=True
    )
    ours = torch.autograd.grad(masked_mean(entropy, completion), trained)
    n = completion.shape[1]
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    logp = F.log_softmax(logits[:, -(n + 1) : -1].double(), -1)
    plain = -(logp.exp() * logp).sum(-1)
    expected = torch.autograd.grad((plain * completion).sum() / completion.sum(), trained)
    assert any(g.abs().max() > 1e-4 for g in expected)  # the adapter moves the entropy
    for got, want in zip(ours, expected, strict=True):
        # float32 softmax against float64 on the same float32 logits: rounding only.
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-7)


def test_entropy_bonus_keeps_the_policy_more_random(tmp_path) -> None:
    def entropies(coef: float) -> list[float]:
        torch.manual_seed(0)
        model, tok = policy()
        out = tmp_path / str(coef)
        ppo.train(model, tok, config(out, 8, entropy_coef=coef), PROMPTS * 4, contains_target)
        return [r["entropy"] for r in records(out)]

    without, bonus = entropies(0.0), entropies(1.0)
    assert without[0] == bonus[0]  # the same first rollout
    # The reward narrows the policy; the bonus holds it back. Measured (seed 0): the last three
    # steps' mean entropy 1.98 nats without the bonus, 2.98 with it.
    assert sum(bonus[-3:]) / 3 > sum(without[-3:]) / 3 + 0.5, (without, bonus)


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path) -> None:
    def run(out, reward_function):
        torch.manual_seed(0)
        model, tok = policy()
        # An adaptive coefficient, so that the controller's state must come back too.
        cfg = config(out, 4, batch=8, minibatches=2, kl_target=0.5, kl_horizon=20)
        ppo.train(model, tok, cfg, PROMPTS * 2, reward_function)

    metrics = ("reward_mean", "loss", "value_loss", "kl", "kl_coef", "entropy")
    straight = assert_resume_repeats(run, tmp_path, metrics)
    assert len({r["kl_coef"] for r in straight}) > 1  # the coefficient did move


def test_nan_reward_stops_and_keeps_the_last_checkpoint(tmp_path) -> None:
    model, tok = policy()
    with pytest.raises(
        ValueError,
        match=r"step 3: the reward function returned nan .*"
        r"stopped before updating; the last checkpoint is .*checkpoint-2 \(a rerun",
    ):
        ppo.train(model, tok, config(tmp_path, 4, batch=4), PROMPTS, nan_after(2, at=-1))


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor seen twice counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _tensors(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A tiny model directory and a reward adapter for it as ``lorakit reward`` writes it (LoRA
    B made non-zero so that the adapter changes the scores)."""
    root = tmp_path_factory.mktemp("reward")
    model_dir = saved_model(root / "model")
    cfg = reward.RewardConfig(
        model=ModelConfig(model=str(model_dir), method="lora"),
        train=TrainConfig(out=str(root / "unused"), seed=1),
    )
    model, _ = reward.untrained(cfg, load_tokenizer(cfg.model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model_dir, save_adapter(model, root / "adapter")


def test_roles_share_one_base_and_the_shared_reward_scores_as_its_own_model(
    tmp_path, reward_adapter
) -> None:
    model_dir, adapter = reward_adapter
    model_config = ModelConfig(model=str(model_dir), method="lora")
    tok = load_tokenizer(model_config)
    model = load_model(model_config)
    base_bytes = _storage_bytes(_tensors(model))
    cfg = config(tmp_path / "out", 1, batch=4, reward_adapter=str(adapter))
    cfg.model = model_config
    head, scorer = ppo.prepare(model, tok, cfg)
    assert isinstance(scorer, ppo.ModelReward)
    assert adapter_names(model) == ["default", "reward", "value"]

    def adapters_and_heads() -> list[torch.Tensor]:
        small = [
            p
            for _, layer in adapter_layers(model)
            for name in layer.settings
            for p in layer.adapter_parameters(name)
        ]
        return [*small, *head.parameters(), *scorer.model.score.parameters()]

    def all_roles() -> int:
        # policy and reference: model; value: model + head; reward: scorer.model (+ model).
        return _storage_bytes(_tensors(model, head, scorer.model, *scorer.model.shared))

    expected = base_bytes + _storage_bytes(adapters_and_heads())
    assert all_roles() == expected
    PPOTrainer(
        model, tok, cfg.train, cfg.ppo, cfg.sampling, PROMPTS, scorer, head
    ).fit()  # every role runs once
    assert all_roles() == expected

    own = reward.load_reward_model(
        reward.RewardConfig(model=model_config, reward=reward.RewardOptions(adapter=str(adapter))),
        tok,
    )
    prompts = [p.raw for p in PROMPTS]
    completions = ["five", "one two", "the capital", "six six six"]
    expected_scores = reward.score(own, tok, prompts, completions)
    # The same float32 computation on the same weights, the LoRA sums in another order (the
    # policy's and the value's adapters sit in the same layers, disabled): rounding only.
    assert scorer(prompts, completions) == pytest.approx(expected_scores, abs=1e-5)
    assert len(set(expected_scores)) == 4  # the scores differ: the check can fail


@pytest.mark.parametrize("value_init", ["auto", "reward", "zero"])
def test_value_model_starts_as_the_reward_model(tmp_path, reward_adapter, value_init) -> None:
    """--value-init auto (the default) and reward: before any update, the value of the state
    before each completion token is the score that the reward model, loaded on its own as a
    transformers sequence classifier, gives the sequence up to that state. zero: every value
    is 0."""
    model_dir, adapter = reward_adapter
    model_config = ModelConfig(model=str(model_dir), method="lora")
    model = load_model(model_config)
    cfg = config(tmp_path / "out", 1, batch=4, reward_adapter=str(adapter), value_init=value_init)
    cfg.model = model_config
    tok = load_tokenizer(model_config)
    head, _ = ppo.prepare(model, tok, cfg)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=g)
    n = 6  # completion tokens: the states before them end at positions 3 .. 8
    with torch.no_grad():
        values = token_values(model, head, "value", ids, torch.ones_like(ids), n)
    own = reward.load_reward_model(
        reward.RewardConfig(model=model_config, reward=reward.RewardOptions(adapter=str(adapter))),
        tok,
    )
    with torch.no_grad():
        scores = torch.stack(
            [own(input_ids=ids[:, : 10 - n + j]).logits[:, 0] for j in range(n)], dim=1
        )
    if value_init == "zero":
        assert torch.equal(values, torch.zeros_like(values))
        return
    assert scores.std() > 0.01  # the reward model tells the prefixes apart: the check can fail
    # The same float32 weights, the LoRA sums in another order: rounding only.
    torch.testing.assert_close(values, scores.float(), rtol=0, atol=1e-5)
    # The copy trains, the reward adapter stays frozen, the policy trains and stays active.
    for _, layer in adapter_layers(model):
        assert all(p.requires_grad for p in layer.adapter_parameters("value"))
        assert all(p.requires_grad for p in layer.adapter_parameters("default"))
        assert not any(p.requires_grad for p in layer.adapter_parameters("reward"))
    assert all(p.requires_grad for p in head.parameters())
    assert active_adapter(model) == "default"


def test_cli_ppo_with_a_shared_reward_adapter_and_mistakes(tmp_path, capsys, reward_adapter):
    model_dir, adapter = reward_adapter
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS))
    argv = [
        "ppo",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--method",
        "qlora",
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert main([*argv, "--reward-adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "trained 2 PPO steps" in out and "value loss" in out
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    # The same reward adapter on a reward model of its own (a second copy of the base).
    own = [*argv, "--out", str(tmp_path / "own"), "--max-steps", "1"]  # the last value counts
    assert main([*own, "--reward-model", str(model_dir), "--reward-adapter", str(adapter)]) == 0
    assert "trained 1 PPO steps" in capsys.readouterr().out
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give one reward" in err[0], err
    assert main([*argv, "--reward-adapter", str(adapter), "--gamma", "2"]) == 2
    assert "gamma" in capsys.readouterr().err
    assert main([*argv, "--reward-function", "x.py:f", "--value-init", "reward"]) == 2
    assert "--value-init reward copies a reward adapter" in capsys.readouterr().err
    assert main([*argv, "--reward-adapter", str(adapter), "--minibatches", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--minibatches 5 is more than the 4 completions of a step" in err[0]


def test_a_reward_model_without_a_score_head_is_refused_before_the_policy_loads(
    tmp_path, capsys
) -> None:
    """--reward-model a plain causal LM: refused in one line, exit status 2, from its files
    alone, before the policy (here a --model that does not exist) is touched."""
    model_dir, data, _ = cli_run_files(tmp_path, "")
    argv = ["ppo", "--model", str(tmp_path / "no-policy"), "--data", str(data), "--method"]
    argv += ["lora", "--out", str(tmp_path / "out"), "--reward-model", str(model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{model_dir} has no trained 'score' head" in err[0], err


def _gae_reference(rewards, values, gamma: float, lam: float) -> tuple[list, list]:
    """GAE of one episode as a plain loop over Python floats (float64)."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_values_and_advantages_equal_plain_computations(tmp_path) -> None:
    """Values read at the right positions of left-padded rows, and the KL-penalised rewards,
    score placement, GAE and whitening of a rollout, against one unpadded forward pass per row
    and plain float64 loops."""
    torch.manual_seed(0)
    model, tok = policy()
    cfg = config(tmp_path, 1, batch=4, kl_coef=0.3, gamma=0.9, lam=0.8)
    head, _ = ppo.prepare(model, tok, cfg, contains_target)
    with torch.no_grad():  # make the adapters and the head matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        head.weight.normal_(0, 0.5)
    trainer = PPOTrainer(
        model, tok, cfg.train, cfg.ppo, cfg.sampling, PROMPTS, contains_target, head
    )
    model.eval()
    prompts = [tok(p.text, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    prompts[1] = prompts[1][:2]  # prompts of different lengths: left padding
    rollout = sample(model, prompts, 2, cfg.sampling, tok.pad_token_id, tok.eos_token_id)
    scores = torch.tensor([1.0, -0.5, 0.25, 2.0])
    targets, _ = trainer._targets(rollout, scores, StepSums())
    lengths = rollout.completion_mask.sum(1).tolist()
    all_advantages = []
    for row, prompt in enumerate(p for p in prompts for _ in range(2)):
        start = rollout.prompt_len - len(prompt)
        ids = rollout.input_ids[row, start : rollout.prompt_len + lengths[row]][None]
        with torch.no_grad(), using_adapter(model, "value"):
            hidden = model.model(input_ids=ids).last_hidden_state[0].double()
        n = lengths[row]
        values = hidden[len(prompt) - 1 : len(prompt) - 1 + n] @ head.weight[0].double()
        values = (values + head.bias.double()).tolist()
        # float32 forward passes with and without padding: rounding only.
        assert targets.values[row, :n].tolist() == pytest.approx(values, abs=1e-5)
        lp = targets.logprobs[row, :n].double()
        with torch.no_grad(), disable_adapters(model):
            logits = model(input_ids=ids).logits[0].double()
        token_ids = ids[0, len(prompt) :]
        ref = F.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(-1, token_ids[:, None])[:, 0]
        rewards = (-0.3 * (lp - ref)).tolist()  # k1, coefficient 0.3
        rewards[-1] += float(scores[row])
        advantages, returns = _gae_reference(rewards, values, 0.9, 0.8)
        assert targets.returns[row, :n].tolist() == pytest.approx(returns, abs=1e-4)
        all_advantages += advantages
    mean = sum(all_advantages) / len(all_advantages)
    var = sum((a - mean) ** 2 for a in all_advantages) / (len(all_advantages) - 1)
    whitened = [(a - mean) / math.sqrt(var + 1e-8) for a in all_advantages]
    mask = rollout.completion_mask.bool()
    assert targets.advantages[mask].tolist() == pytest.approx(whitened, abs=1e-4)
    assert (targets.advantages[~mask] == 0).all()
