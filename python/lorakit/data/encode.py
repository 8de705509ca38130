"""Segments -> token ids with a loss mask, truncated to a maximum length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from lorakit.data.formats import Segment

# Label of a token that is not trained on (PyTorch's cross_entropy ignore_index).
IGNORE = -100


class Tokenizer(Protocol):
    bos_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One tokenized row: ``labels[i]`` is ``input_ids[i]`` where it is trained on, else
    :data:`IGNORE`. Label ``i`` is the target of the prediction made at position ``i - 1``."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def tokenize(segments: list[Segment], tokenizer: Tokenizer) -> Example:
    """Tokenizes each segment on its own and concatenates them, without BOS.

    Segments are tokenized separately so the mask boundary falls exactly between prompt and
    response (tokenizing the joined text could merge the boundary into one token).
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Example(ids, labels)


def encode(segments: list[Segment], tokenizer: Tokenizer) -> Example:
    """:func:`tokenize`, BOS first; chat templates that already start with BOS do not get a
    second one."""
    tokens = tokenize(segments, tokenizer)
    ids, labels = tokens.input_ids, tokens.labels
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    if labels:
        # Nothing predicts the first token (and in a packed block, the previous sequence must
        # not be trained to predict it).
        labels[0] = IGNORE
    return Example(ids, labels)


def truncate(example: Example, max_length: int) -> Example:
    """The first ``max_length`` tokens (the prompt is kept; the response end is cut)."""
    if len(example) <= max_length:
        return example
    return Example(example.input_ids[:max_length], example.labels[:max_length])
