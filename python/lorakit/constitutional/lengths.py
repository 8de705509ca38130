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
    revisions: int
    order: Order
    seed: int
    max_new_tokens: int
    judge: bool


def positions_needed(
    count_tokens: CountTokens, prompts: list[tuple[int, Messages]], shape: LoopShape
) -> list[tuple[int, str]]:
    """For each ``(index, messages)`` prompt, the most positions it can need and where, with
    generated texts counted at ``max_new_tokens`` each (re-encoding a decoded text may differ by
    a token; generation still checks each request as it comes). One ``count_tokens`` call for
    every conversation, so a fast tokenizer encodes them as a batch."""
    conversations: list[Messages] = []
    owners: list[tuple[int, str]] = []  # (prompt position, what the conversation is)
    for position, (index, prompt) in enumerate(prompts):
        picks = pick_principles(
            index, shape.revisions, len(shape.principles), shape.order, shape.seed
        )
        for drawn in dict.fromkeys(picks):
            revising = revision_messages(prompt, "", shape.principles[drawn], "")
            conversations.append(revising)
            owners.append((position, "a revision request"))
        if shape.judge:
            last = shape.principles[picks[-1]]
            conversations.append(judge_messages(prompt, "", "", last))
            owners.append((position, "the judge's question"))
    # A revision request holds a response (or the last revision) and its critique, then the
    # revision is generated; the judge's question holds the first response and the final
    # revision and is read in one forward.
    generated = {"a revision request": 3, "the judge's question": 2}
    needed = [(0, "")] * len(prompts)
    for (position, where), tokens in zip(owners, count_tokens(conversations), strict=True):
        needed[position] = max(
            needed[position], (tokens + generated[where] * shape.max_new_tokens, where)
        )
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
    needs = positions_needed(count_tokens, prompts, shape)
    too_long = [
        (index, *need) for (index, _), need in zip(prompts, needs, strict=True) if need[0] > limit
    ]
    if too_long:
        index, needed, where = too_long[0]
        others = f" ({len(too_long)} prompts do)" if len(too_long) > 1 else ""
        raise ValueError(
            f"prompt {index} of --data can need {needed} positions in {where} (--max-new-tokens "
            f"{shape.max_new_tokens} for each text the model writes), more than the {limit} this "
            f"model has{others}: lower --max-new-tokens or shorten those prompts"
        )
