"""What the critique loop needs from a model: complete conversations, and say how likely each
of a few one-token answers is. :class:`ModelGenerator` does both with a causal LM (batched
sampling with the KV cache, :func:`lorakit.generation.sample`); tests give the loop a scripted
stand-in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.constitutional.conversation import Messages
from lorakit.data.prompts import render_messages
from lorakit.generation import SamplingOptions, sample
from lorakit.generation.sampling import left_pad
from lorakit.models import pad_id
from lorakit.models.modes import evaluating


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    """Tokens generated (the EOS included)."""


class Generator(Protocol):
    def complete(self, conversations: list[Messages]) -> list[Completion]:
        """The assistant's next turn of each conversation."""
        ...

    def choice_probabilities(
        self, conversations: list[Messages], choices: tuple[str, ...]
    ) -> list[list[float]]:
        """For each conversation, the probabilities that the assistant's answer starts with
        each of ``choices``, normalised over them (each row sums to 1)."""
        ...


def choice_token(tokenizer: Any, choice: str) -> int:
    """The token an answer ``choice`` starts with (its first token)."""
    ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer encodes {choice!r} as no token")
    return ids[0]


class ModelGenerator:
    """:class:`Generator` with ``model`` and ``tokenizer``: conversations rendered with the
    tokenizer's chat template (else lorakit's built-in one), completions sampled as
    ``options`` says, ``batch_size`` conversations at a time."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, options: SamplingOptions, batch_size: int
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, so completions cannot end")
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.batch_size = batch_size
        self.pad_id, self.eos_id = pad_id(tokenizer), tokenizer.eos_token_id

    def _encode(self, conversations: list[Messages]) -> list[list[int]]:
        texts = [render_messages(c, self.tokenizer) for c in conversations]
        if not texts:
            return []
        # The rendered text holds the template's own special tokens (BOS, turn markers); one
        # call encodes the batch.
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def count_tokens(self, conversations: list[Messages]) -> list[int]:
        """Each conversation's tokens as :meth:`complete` would feed it to the model."""
        return [len(ids) for ids in self._encode(conversations)]

    def complete(self, conversations: list[Messages]) -> list[Completion]:
        done: list[Completion] = []
        encoded = self._encode(conversations)
        for start in range(0, len(encoded), self.batch_size):
            rollout = sample(
                self.model,
                encoded[start : start + self.batch_size],
                1,
                self.options,
                self.pad_id,
                self.eos_id,
            )
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True):
                kept = ids[mask.bool()]
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                done.append(Completion(text, int(mask.sum())))
        return done

    @torch.no_grad()
    def choice_probabilities(
        self, conversations: list[Messages], choices: tuple[str, ...]
    ) -> list[list[float]]:
        tokens = [choice_token(self.tokenizer, c) for c in choices]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"the choices {choices} start with the same token")
        device = next(self.model.parameters()).device
        encoded = self._encode(conversations)
        rows: list[list[float]] = []
        for start in range(0, len(encoded), self.batch_size):
            ids, mask = left_pad(encoded[start : start + self.batch_size], self.pad_id)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            with evaluating(self.model):
                logits = self.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                ).logits[:, -1]
            # Softmax over the choices' logits alone: their probabilities renormalised to sum 1.
            probs = logits[:, tokens].double().softmax(-1)
            rows += probs.tolist()
        return rows
