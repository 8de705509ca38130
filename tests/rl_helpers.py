"""The tiny policy, prompts and verifiable reward of the GRPO and PPO tests: completions that
contain the word "five" earn 1."""

from __future__ import annotations

import pytest
import torch

from lorakit.data.prompts import Prompt
from sft_helpers import llama, tokenizer
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
