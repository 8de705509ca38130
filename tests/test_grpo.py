"""`lorakit grpo` end to end on a tiny Llama and a verifiable reward (completions that contain
the word "five"): the reward rises while the KL stays bounded, a resumed run repeats the
uninterrupted one, a NaN reward stops with a clear error, prompts come from both formats, and
per-token completion log-probs equal a plain forward pass."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lorakit.cli import main
from lorakit.data.prompts import load_prompts
from lorakit.generation import SamplingOptions, sample
from lorakit.models import ModelConfig
from lorakit.peft import disable_adapters
from lorakit.recipes import grpo
from lorakit.train import TrainConfig
from lorakit.train.grpo import GRPOOptions
from lorakit.train.policy import completion_logprobs, reference_logprobs
from rl_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    PROMPTS,
    assert_resume_repeats,
    contains_target,
    nan_after,
    one_thread,
    policy,
    records,
)
from sft_helpers import saved_model, tokenizer


def config(out, steps: int, lr: float = 1e-2, **options) -> grpo.GRPOConfig:
    return grpo.GRPOConfig(
        model=ModelConfig(method="lora"),
        train=TrainConfig(
            out=str(out),
            max_steps=steps,
            batch_size=4,
            lr=lr,
            schedule="constant",
            warmup=0.0,
            progress=False,
            save_every=2,
        ),
        grpo=GRPOOptions(**{"reward_function": "tests:unused", "group_size": 4, **options}),
        sampling=SamplingOptions(max_new_tokens=4),
    )


def test_reward_rises_while_kl_stays_bounded(tmp_path) -> None:
    torch.manual_seed(0)
    model, tok = policy()
    result = grpo.train(
        model, tok, config(tmp_path, 12, updates=2, beta=0.1), PROMPTS, contains_target
    )
    rows = records(tmp_path)
    assert len(rows) == 12 and result.saved.name == "adapter"
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    # Chance is about 4 tokens x 1/23 words = 0.17. Measured (seed 0): 0.15 over the first three
    # steps, 0.52 over the last three (1.0 at step 8; the constant lr 1e-2 overshoots after).
    assert first < 0.4 and last > first + 0.3, (first, last)
    assert rows[0]["kl"] == 0.0  # the first rollout's policy is the base (LoRA B = 0)
    # The k3 KL per token with beta 0.1: measured at most 1.63 (step 7).
    assert all(0.0 <= r["kl"] < 3.0 for r in rows)
    for name in (
        "entropy",
        "clip_fraction",
        "completion_length",
        "rollout_tokens_per_s",
        "train_s",
        "reward_std",
        "approx_kl",
        "zero_std_fraction",
    ):
        assert all(name in r for r in rows), name
    assert (tmp_path / "metrics.png").is_file()


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path) -> None:
    def run(out, reward):
        torch.manual_seed(0)
        model, tok = policy()
        grpo.train(model, tok, config(out, 4, updates=2, minibatches=2), PROMPTS, reward)

    metrics = ("reward_mean", "loss", "kl", "entropy", "clip_fraction", "completion_length")
    assert_resume_repeats(run, tmp_path, metrics)


def test_nan_reward_stops_and_keeps_the_last_checkpoint(tmp_path) -> None:
    model, tok = policy()
    with pytest.raises(
        ValueError,
        match=r"step 3: the reward function returned nan .*"
        r"last checkpoint: .*checkpoint-2",
    ):
        grpo.train(model, tok, config(tmp_path, 4), PROMPTS, nan_after(2, at=0))


def raises(prompts, completions):
    return {}["missing"]


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        (raises, r"step 1: the reward function raised KeyError: 'missing' \(at .*test_grpo.py:"),
        (lambda p, c: None, r"one number per completion \(16\), got NoneType None"),
        (lambda p, c: ["high"] * len(c), r"one number per completion \(16\), got list \['high'"),
        (
            lambda p, c: [[1.0, 2.0]] * len(c),
            r"one number per completion \(16\), got shape \[16, 2\]",
        ),
    ],
)
def test_a_reward_function_that_fails_or_returns_no_numbers_is_one_line(
    tmp_path, reward, expected
) -> None:
    # These were a traceback (an exception, None) or a message naming no reward function.
    model, tok = policy()
    with pytest.raises(ValueError, match=expected):
        grpo.train(model, tok, config(tmp_path, 1), PROMPTS, reward)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f(:\n", "raised SyntaxError: invalid syntax (at {path}:1)"),
        ("x = 1\nraise RuntimeError('no key')\n", "raised RuntimeError: no key (at {path}:2)"),
    ],
)
def test_a_reward_module_that_fails_to_import_is_one_line(tmp_path, source, expected) -> None:
    # Only ImportError was caught: these were a traceback.
    path = tmp_path / "reward.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=re.escape(expected.format(path=path))):
        grpo.load_reward_function(f"{path}:f")


def test_a_reward_function_that_cannot_take_the_call_is_one_line(tmp_path) -> None:
    def only_prompts(prompts):
        return [0.0] * len(prompts)

    model, tok = policy()
    with pytest.raises(ValueError, match=r"only_prompts\(prompts\) cannot be called as "):
        grpo.train(model, tok, config(tmp_path, 1), PROMPTS, only_prompts)


def test_completions_that_could_outrun_the_models_positions_are_refused_first(tmp_path) -> None:
    model, tok = policy()  # 128 positions
    long = replace(config(tmp_path, 1), sampling=SamplingOptions(max_new_tokens=200))
    with pytest.raises(ValueError, match=r"plus --max-new-tokens 200 is longer than the 128 "):
        grpo.train(model, tok, long, PROMPTS, contains_target)
    assert not (tmp_path / "metrics.jsonl").exists()
    encoded = [tok("one two three", add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match=r"a prompt of 3 tokens plus --max-new-tokens 126 is "):
        sample(model, encoded, 1, SamplingOptions(max_new_tokens=126), tok.pad_token_id, 0)


def _plain_logprobs(model, ids: torch.Tensor, prompt_len: int, temperature: float):
    """Log-probs of ``ids[prompt_len:]`` from one forward pass of the unpadded row, the softmax
    in float64."""
    logits = model(ids[None]).logits[0].double() / temperature
    logp = F.log_softmax(logits, -1)[prompt_len - 1 : -1]
    return logp.gather(-1, ids[prompt_len:, None])[:, 0]


@torch.no_grad()
def test_completion_logprobs_equal_a_plain_forward_pass() -> None:
    torch.manual_seed(0)
    model, tok = policy()
    grpo.prepare_policy(model, config("unused", 1))
    for name, p in model.named_parameters():  # make the adapter matter: policy != reference
        if "lora_B" in name:
            p.normal_(0, 0.05)
    model.eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("one two", "question : a ?")]
    sampling = SamplingOptions(max_new_tokens=5, temperature=0.7)
    rollout = sample(model, prompts, 2, sampling, tok.pad_token_id, tok.eos_token_id)
    args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
    # Sampled under inference mode, but the policy's training forward saves these ids.
    assert not any(t.is_inference() for t in (*args, rollout.ended))
    ours, entropy = completion_logprobs(model, *args, temperature=0.7, with_entropy=True)
    ref = reference_logprobs(model, *args, temperature=0.7)
    assert not torch.allclose(ours, ref)
    for row, prompt in enumerate(p for p in prompts for _ in range(2)):
        length = int(rollout.completion_mask[row].sum())
        start = rollout.prompt_len - len(prompt)  # the row without its left padding
        ids = rollout.input_ids[row, start : rollout.prompt_len + length]
        expected = _plain_logprobs(model, ids, len(prompt), 0.7)
        with disable_adapters(model):
            expected_ref = _plain_logprobs(model, ids, len(prompt), 0.7)
        # float32 forward passes with and without padding: rounding only.
        torch.testing.assert_close(ours[row, :length].double(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ref[row, :length].double(), expected_ref, rtol=0, atol=1e-5)
        assert (ours[row, length:] == 0).all() and (entropy[row, length:] == 0).all()
    assert (entropy[rollout.completion_mask.bool()] > 0).all()


def test_prompts_from_prompt_rows_and_chat_messages(tmp_path) -> None:
    tok = tokenizer()
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "question : one ?", "answer": "two"},
        {
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"},
            ],
            "answer": "x",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load_prompts([str(path)], tok)
    assert first.text == "question : one ?" and first.columns == {"answer": "two"}
    assert second.raw == [{"role": "user", "content": "hello"}]  # the answer turn is dropped
    assert second.text == "<|user|>\nhello\n<|assistant|>\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0: a prompt row needs"):
        load_prompts([str(bad)], tok)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_grpo_runs_and_reports_mistakes(tmp_path, capsys, method) -> None:
    model_dir = saved_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS))
    reward = tmp_path / "reward.py"
    reward.write_text(
        "def contains_five(prompts, completions):\n"
        "    return [float('five' in c.split()) for c in completions]\n"
    )
    argv = [
        "grpo",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--method",
        method,
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert main([*argv, "--reward-function", f"{reward}:contains_five"]) == 0
    assert "trained 2 GRPO steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert main([*argv, "--reward-function", f"{reward}:missing"]) == 2
    assert "has no function 'missing'" in capsys.readouterr().err
