"""Preference pairs as token ids: encoding, truncation, and batches of whole pairs.

Truncation to ``seq_len`` keeps the END of the prompt (the question and the generation prompt
sit there) and the START of each completion (what the model says first). The prompt and the
completions each have a guaranteed share of the budget and take what the other does not need:
the completions keep ``max(seq_len - prompt, seq_len // 2)`` tokens at most and the prompt the
rest, so the prompt keeps at least ``seq_len - seq_len // 2`` tokens when it is that long, and
the completions at least ``seq_len // 2``. Both completions share one budget (that of the longer)
and one cut prompt, so chosen and rejected are still continuations of the same context. A cut
prompt that began with BOS keeps BOS first, followed by its last tokens (when it keeps at least
two tokens; otherwise its last token alone).

A completion's first token is always trained on (see :mod:`lorakit.data.preference`) and always
survives the cut, so truncation never leaves a completion with nothing to train on. It can make
chosen and rejected identical (when they differ only past the cut); such pairs are dropped by
:func:`lorakit.data.prepare_preferences` and counted in its report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.encode import Example, Tokenizer, encode, tokenize
from lorakit.data.packing import Row, collate
from lorakit.data.preference import PairSegments


@dataclass(frozen=True)
class Pair:
    """One tokenized preference pair.

    ``chosen`` and ``rejected`` each hold the prompt's ``prompt_length`` tokens (labels
    :data:`~lorakit.data.IGNORE`), then that completion's tokens (labels as SFT trains them).
    """

    chosen: Example
    rejected: Example
    prompt_length: int
    margin: float

    @property
    def prompt(self) -> list[int]:
        return self.chosen.input_ids[: self.prompt_length]

    def __len__(self) -> int:
        """Tokens of the longer sequence."""
        return max(len(self.chosen), len(self.rejected))


def encode_pair(segments: PairSegments, tokenizer: Tokenizer) -> Pair:
    """Tokenizes the prompt (BOS first, as SFT) and each completion; nothing is cut.

    Raises:
        ValueError: a completion has no token to train on.
    """
    prompt = encode(segments.prompt, tokenizer)
    completions = []
    for name, completion in (("chosen", segments.chosen), ("rejected", segments.rejected)):
        tokens = tokenize(completion, tokenizer)
        if not tokens.trained_tokens:
            raise ValueError(f"'{name}' has no token to train on")
        completions.append(
            Example(prompt.input_ids + tokens.input_ids, prompt.labels + tokens.labels)
        )
    return Pair(*completions, len(prompt), segments.margin)


def truncate_pair(pair: Pair, seq_len: int, bos_id: int | None) -> Pair:
    """Cuts both sequences to at most ``seq_len`` tokens (the rule in the module docstring)."""
    prompt, completion = pair.prompt_length, len(pair) - pair.prompt_length
    if prompt + completion <= seq_len:
        return pair
    keep_completion = min(completion, max(seq_len - prompt, seq_len // 2))
    keep_prompt = min(prompt, seq_len - keep_completion)
    first = pair.prompt[:1] if pair.prompt[0] == bos_id and keep_prompt >= 2 else []
    start = prompt - keep_prompt + len(first)

    def cut(example: Example) -> Example:
        end = prompt + keep_completion
        return Example(
            first + example.input_ids[start:end],
            example.labels[: len(first)] + example.labels[start:end],
        )

    return Pair(cut(pair.chosen), cut(pair.rejected), keep_prompt, pair.margin)


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of ``B`` pairs as ``2B`` rows, so that one forward pass scores both sides.

    Rows ``0..B-1`` are the chosen sequences and rows ``B..2B-1`` the rejected ones (pair ``i``
    is rows ``i`` and ``B + i``), padded on the right to the longest, ``n`` tokens:

    - ``input_ids``, ``labels``, ``position_ids``: (2B, n) long, as :func:`lorakit.data.collate`
      builds them (padding: ``pad_id``, labels :data:`~lorakit.data.IGNORE`);
    - ``attention_mask``: (2B, n) long, 1 on real tokens (a reward head reads the last one);
    - ``margin``: (B,) float32, each pair's margin (0 where the data gives none).
    """
    rows = [Row.of(p.chosen) for p in pairs] + [Row.of(p.rejected) for p in pairs]
    batch = collate(rows, pad_id)
    lengths = torch.tensor([len(r) for r in rows])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch
