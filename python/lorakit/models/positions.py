"""How many positions a model has: past them a learned position table (GPT-2, OPT) fails with an
IndexError deep in the forward, and rotary embeddings run at positions the model never saw."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def position_limit(model: nn.Module) -> int | None:
    """``max_position_embeddings`` of the model's config, times its RoPE scaling factor where it
    has one (context extension); None where the config states no limit."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(config, "rope_parameters", None)
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if isinstance(factor, int | float) and factor > 1:
        return int(limit * factor)
    return limit


def check_generation(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuses to generate past the model's positions (:func:`position_limit`).

    Raises:
        ValueError: naming the prompt's length, ``--max-new-tokens`` and the limit.
    """
    limit = position_limit(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens plus --max-new-tokens {max_new_tokens} is longer "
            f"than the {limit} positions this model has (max_position_embeddings in its "
            "config.json): lower --max-new-tokens or shorten the prompts"
        )


def check_positions(model: nn.Module, lengths: Iterable[int]) -> None:
    """Refuses data whose longest example (``lengths``: each example's tokens, counted from its
    first position) runs past the positions the model has (:func:`position_limit`).

    Raises:
        ValueError: naming both lengths.
    """
    limit = position_limit(model)
    longest = max(lengths, default=0)
    if limit is not None and longest > limit:
        raise ValueError(
            f"the data holds an example of {longest} tokens, longer than the {limit} positions "
            f"this model has (max_position_embeddings in its config.json): lower --seq-len to "
            f"{limit} or less"
        )
