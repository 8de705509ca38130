"""Whether data fits the model's vocabulary: an id past its input embeddings fails with an
IndexError deep in the forward on the CPU, and a device-side assert on a GPU."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

_RESIZE = (
    "its tokenizer has tokens the model was not resized for (resize its embeddings with "
    "resize_token_embeddings and save it, or use the model's own tokenizer)"
)


def check_token_ids(
    model: nn.Module,
    sequences: Iterable[Sequence[int]],
    special: Mapping[str, int | None] | None = None,
) -> None:
    """Refuses token ``sequences``, or ``special`` tokens that batches add (``{"pad": id}``,
    ``{"eos": id}``), holding an id that ``model`` has no input embedding for: a tokenizer
    given tokens the model was not resized for. A tokenizer may list more tokens than the
    model embeds (Gemma 3's image token) as long as neither the data nor the batches use them.

    Raises:
        ValueError: naming the id (or the special token) and the number of embeddings.
    """
    embeddings = getattr(model, "get_input_embeddings", None)  # not on lorakit's wrappers
    rows = getattr(embeddings(), "num_embeddings", None) if embeddings else None
    if not isinstance(rows, int):
        return
    for name, token in (special or {}).items():
        if token is not None and token >= rows:
            raise ValueError(
                f"the {name} token's id {token} is past the model's {rows} input embeddings: "
                f"{_RESIZE}"
            )
    largest = max((max(ids) for ids in sequences if ids), default=-1)
    if largest >= rows:
        raise ValueError(
            f"the data holds token id {largest}, but the model has only {rows} input "
            f"embeddings: {_RESIZE}"
        )
