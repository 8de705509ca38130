"""The tiny policy, prompts and verifiable reward of the GRPO and PPO tests: completions that
contain the word "five" earn 1."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.data.prompts import Prompt
from sft_helpers import llama, saved_model, tokenizer
from test_trainer_ddp import records as records  # the metrics.jsonl rows of a run

TARGET = "five"
PROMPTS = [Prompt(f"question : {w} ?", f"question : {w} ?") for w in ("one", "two", "three", "a")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (import it into a test module to use it): these are tiny matmuls,
    and on a loaded 2-core machine the native LoRA ops' thread pool made a 4-step run take 26 s
    instead of 5 s (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_run_files(root: Path, reward_source: str) -> tuple[Path, Path, Path]:
    """What an RL command needs on disk: a tiny model directory, :data:`PROMPTS` as a prompts
    file, and ``reward_source`` as a reward module. Returns their paths."""
    model_dir = saved_model(root / "model")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS))
    reward = root / "reward.py"
    reward.write_text(reward_source)
    return model_dir, data, reward


def contains_target(prompts: list, completions: list[str], **_: object) -> list[float]:
    return [float(TARGET in c.split()) for c in completions]


def policy():
    """A tiny random Llama whose head is scaled up: at Llama's init (std 0.02) the logits of a
    32-wide model are almost uniform and a LoRA on the blocks barely moves them."""
    tok = tokenizer()
    model = llama(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model, tok


def interrupting(after: int):
    """The reward, until its call ``after + 1`` raises KeyboardInterrupt (a killed run)."""
    calls = {"n": 0}

    def reward(prompts, completions, **columns):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return contains_target(prompts, completions)

    return reward


def nan_after(calls: int, at: int) -> Callable[..., list[float]]:
    """The reward, whose calls after the first ``calls`` put NaN at position ``at``."""
    count = {"n": 0}

    def reward(prompts, completions, **_):
        count["n"] += 1
        values = contains_target(prompts, completions)
        if count["n"] > calls:
            values[at] = float("nan")
        return values

    return reward


def assert_resume_repeats(
    run: Callable[[Path, Callable[..., list[float]]], None], out: Path, metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Runs ``run(directory, reward)`` for 4 steps straight, then killed in step 4 (its last
    checkpoint at step 2) and resumed; asserts that the resumed run logs every step with the
    straight run's ``metrics``. Returns the straight run's records."""
    run(out / "straight", contains_target)
    # Stopped with one line saying where to resume from (the CLI prints it, exit status 130).
    with pytest.raises(KeyboardInterrupt, match=r"after step 3 of 4; the last checkpoint is .*-2"):
        run(out / "resumed", interrupting(after=3))
    run(out / "resumed", contains_target)
    straight, resumed = records(out / "straight"), records(out / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        for name in metrics:
            assert a[name] == b[name], (a["step"], name)
    return straight
