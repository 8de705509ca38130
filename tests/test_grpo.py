"""`lorakit grpo` end to end on a tiny Llama and a verifiable reward (completions that contain
the word "five"): the reward rises while the KL stays bounded, a resumed run repeats the
uninterrupted one, a NaN reward stops with a clear error, prompts come from both formats, and
per-token completion log-probs equal a plain forward pass."""

from __future__ import annotations

import fcntl
import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lorakit.cli import main
from lorakit.data.prompts import load_prompts
from lorakit.generation import SamplingOptions, sample
from lorakit.models import ModelConfig, load_model
from lorakit.nn import NF4Linear
from lorakit.peft import LoraConfig, apply_lora, disable_adapters, save_adapter
from lorakit.recipes import grpo
from lorakit.train import Diverged, TrainConfig
from lorakit.train.grpo import GRPOOptions, GRPOTrainer
from lorakit.train.out_dir import LOCK
from lorakit.train.policy import completion_logprobs, reference_logprobs
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
from sft_helpers import saved_model, tokenizer

# A reward module whose function scores every completion 1.
SCORE_ONE = "def score(prompts, completions):\n    return [1.0 for _ in completions]\n"


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
        r"stopped before updating; the last checkpoint is .*checkpoint-2 \(a rerun",
    ):
        grpo.train(model, tok, config(tmp_path, 4), PROMPTS, nan_after(2, at=0))


def test_a_non_finite_parameter_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    """An update that leaves a trained parameter infinite (here: step 3's, poisoned after the
    fact) stops the run before that step's checkpoint is written."""
    torch.manual_seed(0)
    model, tok = policy()
    step_once = GRPOTrainer._step

    def poisoned(self, step):
        metrics = step_once(self, step)
        if step == 2:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad)[0] = float("inf")
        return metrics

    monkeypatch.setattr(GRPOTrainer, "_step", poisoned)
    with pytest.raises(
        Diverged, match=r"at step 3: a trained parameter is NaN or infinite .*checkpoint-2"
    ):
        grpo.train(model, tok, config(tmp_path, 4), PROMPTS, contains_target)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"


def raises(prompts, completions):
    return {}["missing"]


def parses(prompts, completions):
    return [json.loads("{") for _ in completions]  # fails inside the json module


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        (
            raises,
            r"step 1: the reward function raised KeyError: 'missing' \(at .*test_grpo.py:\d+\); "
            r"stopped before updating; no checkpoint in .* yet",
        ),
        # Where it failed in the user's file, not in the library it called.
        (parses, r"raised JSONDecodeError: .* \(at .*test_grpo.py:\d+\); stopped"),
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


def test_a_missing_reward_file_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^--reward-function '.*nope.py:f': .*nope.py does not"):
        grpo.load_reward_function(f"{tmp_path / 'nope.py'}:f")


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
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: a prompt row needs"):
        load_prompts([str(bad)], tok)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_grpo_runs_and_reports_mistakes(tmp_path, capsys, method) -> None:
    model_dir, data, reward = cli_run_files(
        tmp_path,
        "def contains_five(prompts, completions):\n"
        "    return [float('five' in c.split()) for c in completions]\n",
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
    # 2 prompts x 2 completions: a fifth minibatch would be empty.
    assert main([*argv, "--reward-function", f"{reward}:contains_five", "--minibatches", "5"]) == 2
    assert "--minibatches 5 is more than the 4 completions" in capsys.readouterr().err
    assert main([*argv, "--reward-function", f"{reward}:contains_five", "--fsdp"]) == 2
    assert "grpo does not shard the model (--fsdp)" in capsys.readouterr().err


def test_a_resume_with_other_options_or_processes_is_refused(tmp_path, capsys) -> None:
    """GRPO / PPO checkpoints hold every option of the run and the number of processes, as the
    Trainer's do: a resume that would not continue the same run is one line, and --no-resume
    starts afresh without the old run's checkpoints."""
    model_dir, data, reward = cli_run_files(
        tmp_path, "def score(prompts, completions):\n    return [1.0 for _ in completions]\n"
    )
    out = tmp_path / "out"
    argv = [
        "grpo", "--model", str(model_dir), "--data", str(data), "--method", "lora",
        "--out", str(out), "--reward-function", f"{reward}:score", "--max-steps", "2",
        "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--save-every", "1",
        "--no-progress",
    ]  # fmt: skip

    def refused(extra: list[str], expected: str) -> None:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "--no-resume" in err[0], err

    assert main(argv) == 0
    capsys.readouterr()  # saving the model above showed a progress bar
    refused(["--lr", "0.5"], "checkpoint-2 was trained with other options (train.lr")
    refused(["--group-size", "3"], "grpo.group_size 2 -> 3")
    refused(["--max-new-tokens", "4"], "sampling.max_new_tokens 3 -> 4")
    prompts = data.read_text()
    data.write_text(prompts.replace("one", "two"))  # the same file, other prompts
    refused([], "checkpoint-2 was trained on other rows (a data file or the tokenizer changed")
    data.write_text(prompts)
    state_file = out / "checkpoint-2" / "trainer.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1 and state["config"]["grpo"]["group_size"] == 2
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    refused([], "was written by 2 process(es), this run has 1")
    # A checkpoint of before runs stored every option: its training options are compared.
    old = {k: v for k, v in state.items() if k != "world_size"}
    state_file.write_text(json.dumps({**old, "config": state["config"]["train"]}))
    refused(["--max-steps", "3"], "train.max_steps 2 -> 3")
    assert main([*argv, "--kl-warn", "5"]) == 0  # when a warning is printed may change
    assert main([*argv, "--no-resume", "--lr", "0.5", "--max-steps", "1"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1]


def test_a_second_rl_run_on_one_directory_is_refused(tmp_path, capsys) -> None:
    model_dir, data, reward = cli_run_files(
        tmp_path, "def score(prompts, completions):\n    return [1.0 for _ in completions]\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()  # saving the model above showed a progress bar
    common = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    common += ["--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "2"]
    with (out / LOCK).open("a+") as held:  # another process's lock (one open file = one owner)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        for command in ("grpo", "ppo"):
            assert main([command, *common, "--reward-function", f"{reward}:score"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "in use" in err[0] and "pid 4242" in err[0], err
        assert not (out / "latest").exists()


def test_a_diverging_rl_run_stops_in_one_line(tmp_path, capsys) -> None:
    """--lr 1e30: the first update blows the policy up. GRPO's next rollout meets logits that
    cannot be sampled from, PPO's second update a NaN gradient norm; each stops with one line
    naming the step and the last checkpoint, exit status 2, instead of torch's error about a
    probability tensor (GRPO) or a FloatingPointError traceback (PPO)."""
    model_dir, data, reward = cli_run_files(
        tmp_path,
        "def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n",
    )
    capsys.readouterr()  # saving the model above showed a progress bar
    common = ["--model", str(model_dir), "--data", str(data), "--no-progress", "--lr", "1e30"]
    common += ["--max-steps", "4", "--batch-size", "2", "--max-new-tokens", "3"]
    common += ["--reward-function", f"{reward}:score", "--save-every", "1"]
    expected = {
        "grpo": "the model's next-token logits are NaN or infinite when sampling step 2's "
        "completions; the last checkpoint is",
        "ppo": "the gradient norm is nan; no parameter was updated in step 1; no checkpoint",
    }
    for command, message in expected.items():
        assert main([command, *common, "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "training diverged: " in err[0] and message in err[0], err


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_an_init_adapter_continues_on_the_base_it_was_trained_on(tmp_path, method) -> None:
    # lorakit sft --method qlora trains its adapter against the NF4 base: continued on the dense
    # one, the policy would start as another model than the one SFT left.
    model_dir = saved_model(tmp_path / "model")
    trained = load_model(ModelConfig(model=str(model_dir)))
    # Blocks of 32, not the policy's default 64: the record in the adapter says how to quantize.
    quantize = "nf4" if method == "qlora" else None
    apply_lora(trained, LoraConfig(r=4, quantize=quantize, blocksize=32))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    adapter = save_adapter(trained, tmp_path / "adapter")
    policy = load_model(ModelConfig(model=str(model_dir)))
    options = grpo.InitOptions(init_adapter=str(adapter))
    grpo.prepare_policy(policy, grpo.GRPOConfig(model=ModelConfig(method=method), init=options))
    bases = [m.base for n, m in policy.named_modules() if n.endswith("q_proj")]
    assert all(isinstance(b, NF4Linear) == (method == "qlora") for b in bases)
    ids = torch.randint(0, 20, (2, 6))  # the word tokenizer's vocabulary
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, trained(ids).logits, rtol=0, atol=0)
    other = "lora" if method == "qlora" else "qlora"
    with pytest.raises(ValueError, match=f"continue it with --method {method}, not --method"):
        grpo.check_init_adapter(options, other)
