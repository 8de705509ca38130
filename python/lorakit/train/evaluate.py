"""Exact-match accuracy of a model's greedy answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.data.encode import IGNORE, encode
from lorakit.data.packing import Row, collate
from lorakit.models import pad_id


@torch.no_grad()
def completion_accuracy(
    model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, str]], batch_size: int = 64
) -> float:
    """Share of ``{"prompt", "completion"}`` rows whose completion the model's greedy decoding
    reproduces token for token.

    Greedy decoding produces the completion exactly when, fed the completion's own tokens,
    every next-token argmax equals the next completion token: so one teacher-forced forward pass
    per batch decides it, without a generation loop.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    correct = 0
    for i in range(0, len(rows), batch_size):
        examples = [
            encode([(r["prompt"], False), (r["completion"], True)], tokenizer)
            for r in rows[i : i + batch_size]
        ]
        batch = {k: v.to(device) for k, v in collate([Row.of(e) for e in examples], pad).items()}
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        targets = batch["labels"][:, 1:]
        hits = (logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE)
        correct += int(hits.all(dim=1).sum())
    model.train(was_training)
    return correct / max(1, len(rows))
