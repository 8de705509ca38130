"""Per-token log-probs (and entropy) of sampled completions under a policy, its reference (the
same model with adapters disabled: no second copy of the base) or any other adapter."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lorakit.data.encode import IGNORE
from lorakit.losses import entropy_from_logits, token_logprobs_from_logits
from lorakit.models.modes import evaluating
from lorakit.peft import disable_adapters


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log pi(y_t | x, y_<t)`` of every completion token, float32, (rows, completion_len).

    The completion is the last ``completion_mask.shape[1]`` columns of ``input_ids``; the logits
    are divided by the sampling ``temperature`` (the distribution the tokens were drawn from, as
    TRL's GRPO does). Only the completion's logits are computed where the model takes
    ``logits_to_keep``. Positions count from each row's first real token (left padding).

    Returns:
        ``(logprobs, entropy)``: each (rows, completion_len), 0 where ``completion_mask`` is 0;
        the entropy only when ``with_entropy``, detached unless ``entropy_grad`` (an entropy
        bonus).
    """
    n = completion_mask.shape[1]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n + 1
    logits = model(**kwargs, use_cache=False).logits[:, -(n + 1) :]
    if temperature != 1.0:
        logits = logits / temperature
    completion = input_ids[:, -n:].masked_fill(completion_mask == 0, IGNORE)
    labels = torch.cat([completion.new_full((len(completion), 1), IGNORE), completion], dim=1)
    logprobs = token_logprobs_from_logits(logits, labels)[:, 1:].float()
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits[:, :-1]).float() * completion_mask
    return logprobs, entropy


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`completion_logprobs` of the base model alone (adapters disabled, eval mode)."""
    with disable_adapters(model), evaluating(model):
        logprobs, _ = completion_logprobs(
            model, input_ids, attention_mask, completion_mask, temperature
        )
    return logprobs
