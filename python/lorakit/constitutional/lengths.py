"""The longest request each prompt can lead to, checked against the model's positions before the
first generation, so that a prompt too long for the loop is refused at the start of a run rather
than when its batch comes up.

A revision request is the longest conversation the loop generates from: the prompt, the drawn
principle's examples and requests, the response being revised and its critique, each of the two
at most ``max_new_tokens`` (every later round revises one response, so rounds do not add up).
The judge's question holds the first response and the final revision, and is read, not continued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorakit.constitutional.conversation import Messages, judge_messages, revision_messages
from lorakit.constitutional.loop import Order, pick_principles
from lorakit.constitutional.principles import Principle

CountTokens = Callable[[list[Messages]], list[int]]
"""Each conversation's tokens as the generator renders and encodes it."""


@dataclass(frozen=True)
class LoopShape:
    """What the loop does with each prompt: which principles it draws, how much it generates,
    whether it judges."""

    principles: list[Principle]
    rounds: int
    order: Order
    seed: int
    max_new_tokens: int
    judge: bool


def positions_needed(
    count_tokens: CountTokens, index: int, prompt: Messages, shape: LoopShape
) -> tuple[int, str]:
    """The most positions prompt ``index`` can need, and where: generated texts are counted at
    ``max_new_tokens`` each (re-encoding a decoded text may differ by a token; generation still
    checks each request as it comes)."""
    picks = pick_principles(index, shape.rounds, len(shape.principles), shape.order, shape.seed)
    drawn = [shape.principles[i] for i in dict.fromkeys(picks)]
    # The response (or last revision) and its critique in the request, then the revision.
    revising = max(count_tokens([revision_messages(prompt, "", p, "") for p in drawn]))
    needed = (revising + 3 * shape.max_new_tokens, "a revision request")
    if shape.judge:
        question = count_tokens([judge_messages(prompt, "", "", shape.principles[picks[-1]])])[0]
        # The first response and the final revision, read in one forward.
        needed = max(needed, (question + 2 * shape.max_new_tokens, "the judge's question"))
    return needed


def check_lengths(
    count_tokens: CountTokens,
    prompts: list[tuple[int, Messages]],
    shape: LoopShape,
    limit: int | None,
) -> None:
    """Refuses the run if some prompt can need more than the model's ``limit`` positions (None:
    no limit is known).

    Raises:
        ValueError: naming the first such prompt (its index in ``--data``), what it can need,
            and how many prompts can.
    """
    if limit is None:
        return
    too_long = [
        (index, *needed)
        for index, prompt in prompts
        if (needed := positions_needed(count_tokens, index, prompt, shape))[0] > limit
    ]
    if too_long:
        index, needed, where = too_long[0]
        others = f" ({len(too_long)} prompts do)" if len(too_long) > 1 else ""
        raise ValueError(
            f"prompt {index} of --data can need {needed} positions in {where} (--max-new-tokens "
            f"{shape.max_new_tokens} for each text the model writes), more than the {limit} this "
            f"model has{others}: lower --max-new-tokens or shorten those prompts"
        )
