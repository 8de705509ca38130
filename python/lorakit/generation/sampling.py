"""Sampling completions of a batch of prompts with transformers' ``generate``.

The model's own layers run (LoRA / QLoRA adapters included, and the NF4 decode kernel for the
few rows a decoding step has), with the KV cache. Prompts are left-padded so that every row's
completion starts at the same column; a completion ends at its first EOS (kept: the policy is
trained to stop) or at ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from lorakit.models.modes import evaluating
from lorakit.models.positions import check_generation


@dataclass
class SamplingOptions:
    """How completions are sampled."""

    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0; 1: the model's distribution)."}
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Nucleus sampling: keep the smallest set of tokens whose "
            "probability reaches top_p (1: all)."
        },
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Rollout:
    """Sampled sequences: ``rows`` = prompts x completions per prompt, prompt ``i``'s
    completions in rows ``[i * G, (i + 1) * G)``."""

    input_ids: torch.Tensor
    """(rows, prompt_len + completion_len): left-padded prompt, then the completion, padded."""
    attention_mask: torch.Tensor
    """(rows, prompt_len + completion_len): 1 on real prompt tokens and completion tokens."""
    completion_mask: torch.Tensor
    """(rows, completion_len): 1 on completion tokens up to and including the first EOS."""
    prompt_len: int
    ended: torch.Tensor
    """(rows,) True where the completion ended with EOS (not cut at ``max_new_tokens``)."""

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (as ``generate`` uses them)."""
        return (self.attention_mask.cumsum(1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one length: ``(input_ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def completion_mask(completions: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) 1 up to and including each row's first ``eos_id``; and whether it had one."""
    is_eos = completions == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.int().argmax(1), completions.shape[1])
    positions = torch.arange(completions.shape[1], device=completions.device)
    return (positions <= first.unsqueeze(1)).long(), ended


class NonFiniteLogits(ValueError):
    """The model's next-token logits hold NaN or +inf (its weights diverged): no token can be
    drawn from them."""


class _RefuseNonFinite(LogitsProcessor):
    """Stops generation at the first step whose logits hold NaN or +inf, which torch's sampling
    would meet with an error about probabilities naming neither the model nor the cause (-inf
    is a token ruled out, as top-p leaves them)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
            raise NonFiniteLogits("the model's next-token logits are NaN or infinite")
        return scores


def sample(
    model: nn.Module,
    prompt_ids: list[list[int]],
    group_size: int,
    options: SamplingOptions,
    pad_id: int,
    eos_id: int,
) -> Rollout:
    """``group_size`` completions of each prompt (token ids, without padding), sampled with the
    torch random generator of the model's device (seed it for reproducible rollouts).

    Raises:
        NonFiniteLogits: the model's logits hold NaN or +inf.
    """
    check_generation(model, max(map(len, prompt_ids), default=0), options.max_new_tokens)
    device = next(model.parameters()).device
    repeated = [ids for ids in prompt_ids for _ in range(group_size)]
    ids, mask = left_pad(repeated, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # Inference mode rather than no_grad: every op then skips autograd's dispatch entirely (under
    # no_grad only lorakit's own ops do). Its tensors cannot be saved for backward, so the result
    # is copied out of it.
    with evaluating(model), torch.inference_mode():
        generate: Any = model.generate
        out = generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=0,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([_RefuseNonFinite()]),
        )
    out = out.clone()  # a normal tensor: the policy's training forward takes these ids
    completions = out[:, ids.shape[1] :]
    done, ended = completion_mask(completions, eos_id)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([mask, done], dim=1),
        completion_mask=done,
        prompt_len=ids.shape[1],
        ended=ended,
    )
