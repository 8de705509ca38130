"""The critique loop (Constitutional AI's supervised stage, Bai et al. 2022, "Constitutional AI:
Harmlessness from AI Feedback"): a response to each prompt, then ``rounds`` times a principle,
a critique of the current response against it, and a revision given the critique. Optionally
the AI-feedback stage's labels: the model judges which of the first response and the final
revision better follows a principle.

Prompts of a batch advance together, one generation call per stage, so the generator batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from lorakit.constitutional.conversation import (
    Messages,
    critique_messages,
    judge_messages,
    revision_messages,
)
from lorakit.constitutional.generator import Generator
from lorakit.constitutional.principles import Principle

Order = Literal["random", "round-robin"]
CHOICES = ("A", "B")


@dataclass(frozen=True)
class Step:
    """One round: the principle, the critique, and the revision (the next current response;
    an empty revision keeps the previous response)."""

    principle: str
    critique: str
    revision: str


@dataclass
class Record:
    """Everything generated for one prompt."""

    id: int
    prompt: Messages
    response: str
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0
    judge: dict[str, float | str] | None = None
    """With judging: the principle asked about and the normalised probabilities that the final
    revision (``chosen``) or the first response (``rejected``) follows it better."""

    @property
    def final(self) -> str:
        return self.steps[-1].revision if self.steps else self.response

    @property
    def changed(self) -> bool:
        return self.final != self.response


def pick_principles(index: int, rounds: int, count: int, order: Order, seed: int) -> list[int]:
    """Which of ``count`` principles each round of prompt ``index`` uses: drawn with a
    generator seeded by ``(seed, index)`` (the same choices whatever else runs, e.g. on
    resume), or round-robin starting at principle ``index % count``."""
    if order == "round-robin":
        return [(index + r) % count for r in range(rounds)]
    rng = random.Random(f"{seed}:{index}")
    return [rng.randrange(count) for _ in range(rounds)]


def critique_batch(
    generator: Generator,
    prompts: list[tuple[int, Messages]],
    principles: list[Principle],
    rounds: int,
    order: Order,
    seed: int,
) -> list[Record]:
    """Responses, then ``rounds`` critiques and revisions, for ``(id, messages)`` prompts."""
    records = []
    for (index, messages), first in zip(
        prompts, generator.complete([m for _, m in prompts]), strict=True
    ):
        records.append(Record(index, messages, first.text, tokens=first.tokens))
    picks = [pick_principles(r.id, rounds, len(principles), order, seed) for r in records]
    for round_ in range(rounds):
        chosen = [principles[p[round_]] for p in picks]
        critiques = generator.complete(
            [critique_messages(r.prompt, r.final, p) for r, p in zip(records, chosen, strict=True)]
        )
        revisions = generator.complete(
            [
                revision_messages(r.prompt, r.final, p, c.text)
                for r, p, c in zip(records, chosen, critiques, strict=True)
            ]
        )
        for record, principle, critique, revision in zip(
            records, chosen, critiques, revisions, strict=True
        ):
            record.tokens += critique.tokens + revision.tokens
            record.steps.append(Step(principle.name, critique.text, revision.text or record.final))
    return records


def judge_batch(
    generator: Generator, records: list[Record], principles: dict[str, Principle]
) -> None:
    """Sets ``judge`` on every record whose final revision differs from its first response:
    the probabilities that each better follows the last round's principle, asked in both
    orders (A = revision, then A = first response) and averaged, so that a preference for a
    letter or a position cancels out."""
    judged = [r for r in records if r.changed and r.steps]
    conversations = []
    for r in judged:
        principle = principles[r.steps[-1].principle]
        conversations.append(judge_messages(r.prompt, r.final, r.response, principle))
        conversations.append(judge_messages(r.prompt, r.response, r.final, principle))
    probabilities = generator.choice_probabilities(conversations, CHOICES)
    for i, record in enumerate(judged):
        revision_first, revision_second = probabilities[2 * i], probabilities[2 * i + 1]
        chosen = (revision_first[0] + revision_second[1]) / 2
        record.judge = {
            "principle": record.steps[-1].principle,
            "chosen": chosen,
            "rejected": (revision_first[1] + revision_second[0]) / 2,
        }
