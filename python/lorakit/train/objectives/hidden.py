"""The final hidden states of a causal LM without its logits over the whole vocabulary.

At a 128K vocabulary the float32 logits of a batch outweigh everything else a preference step
holds; a loss that needs only the log-probs of given tokens can compute them from the hidden
states and the head's weight chunk by chunk (:mod:`lorakit.losses.logprobs`). The model still
runs through its own ``forward`` (so DDP, adapters and prefixes work as usual), asked for the
logits of its last position only (``logits_to_keep=1``); a hook on its decoder keeps the final
(normalised) hidden states.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lorakit.train import distributed


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if it is a plain ``nn.Linear`` (an adapted or quantized head, or a
    model that cannot skip its full logits, gets None: use its logits)."""
    inner = distributed.unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    get_decoder = getattr(inner, "get_decoder", None)
    if get_head is None or get_decoder is None:
        return None
    head = get_head()
    keeps = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return head if type(head) is nn.Linear and keeps else None


def head_softcap(model: nn.Module) -> float:
    """The final logit soft-capping ``c`` of ``model``'s head (``c * tanh(z / c)``, Gemma 2's
    ``final_logit_softcapping``), 0 for none: what the log-probs from its hidden states must
    apply to match its logits."""
    config = getattr(distributed.unwrapped(model), "config", None)
    return float(getattr(config, "final_logit_softcapping", None) or 0.0)


def final_hidden(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """``model``'s final hidden states (batch, n, hidden) for ``inputs``; requires
    :func:`plain_head` to have returned a head."""
    inner = distributed.unwrapped(model)
    captured: list[torch.Tensor] = []

    def keep(_: nn.Module, __: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]
