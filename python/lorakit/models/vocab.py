"""Whether data fits the model's vocabulary: an id past its input embeddings fails with an
IndexError deep in the forward on the CPU, and a device-side assert on a GPU."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn


def check_token_ids(model: nn.Module, sequences: Iterable[Sequence[int]]) -> None:
    """Refuses token ``sequences`` holding an id that ``model`` has no input embedding for: a
    tokenizer given tokens the model was not resized for. A tokenizer may list more tokens than
    the model embeds (Gemma 3's image token) as long as the data never uses them.

    Raises:
        ValueError: naming the id and the number of embeddings.
    """
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    largest = max((max(ids) for ids in sequences if ids), default=-1)
    if isinstance(rows, int) and largest >= rows:
        raise ValueError(
            f"the data holds token id {largest}, but the model has only {rows} input "
            "embeddings: its tokenizer has tokens the model was not resized for (resize its "
            "embeddings with resize_token_embeddings and save it, or use the model's own "
            "tokenizer)"
        )
