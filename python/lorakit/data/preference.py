"""Preference rows -> a prompt and two completions (chosen, rejected) as text segments.

Layouts (those of TRL's preference datasets), told apart by each row's values:

- strings: ``{"prompt": str, "chosen": str, "rejected": str}``. Each completion is rendered as
  the ``prompt_completion`` SFT format renders its completion: the text, then EOS, trained on.
- conversations with an explicit prompt: ``{"prompt": [messages], "chosen": [messages],
  "rejected": [messages]}``, the completions starting with an assistant message.
- conversations with an implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``; the
  prompt is the longest common prefix of the two lists, short of the last message of the shorter
  one (as TRL's ``extract_prompt``), so that each completion keeps at least one message. A string
  ``prompt`` beside message lists is ignored (as TRL's ``maybe_extract_prompt`` does: datasets
  such as UltraFeedback repeat the prompt there in plain text).

String completions without a prompt are refused: TRL would split them at their longest common
prefix of characters, which can fall inside a word.

Any row may add ``"margin": number`` (how strongly chosen is preferred, for the reward loss);
without the column it is 0. A conversation is rendered as SFT's ``chat`` format renders it (the
tokenizer's chat template, else the built-in one) and cut before the completion's first
assistant turn: the prompt includes that turn's header (the generation prompt) and is not
trained on; in the completion, assistant turns and their end-of-turn markup are trained on, as
in SFT, and any other turns are not. A prompt that ends with an assistant message is context:
the completion is a new assistant turn after it (TRL would continue that message instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorakit.data.formats import ChatTokenizer, Segment, chat_segments, check_messages, text_field

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairSegments:
    """One preference row as text: the prompt (not trained on) and each completion."""

    prompt: list[Segment]
    chosen: list[Segment]
    rejected: list[Segment]
    margin: float

    @property
    def identical(self) -> bool:
        """Whether chosen and rejected render to the same text (the pair teaches nothing)."""
        return _text(self.chosen) == _text(self.rejected)

    @property
    def text(self) -> str:
        """The whole pair as one text, for deduplication."""
        return "\n".join(_text(s) for s in (self.prompt, self.chosen, self.rejected))


def _text(segments: list[Segment]) -> str:
    return "".join(text for text, _ in segments)


def split_prompt(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """``(prompt, chosen completion, rejected completion)``: the prompt is the longest common
    prefix of the two conversations, short of the last message of the shorter one."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _margin(row: Mapping[str, Any]) -> float:
    if "margin" not in row:
        return 0.0
    value = row["margin"]
    # A column present in the file but empty in this row is a mistake, not a zero margin.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'margin' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"'margin' must be finite, got {value}")
    return float(value)


def _chat_pair(
    prompt: list[dict[str, str]],
    chosen: list[dict[str, str]],
    rejected: list[dict[str, str]],
    tokenizer: ChatTokenizer,
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    if not prompt:
        raise ValueError("'chosen' and 'rejected' share no prompt: their first messages differ")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0]["role"] != "assistant":
            raise ValueError(
                f"'{name}' must continue the prompt with an assistant message, "
                f"got {completion[0]['role']!r}"
            )
    assistant_turns = sum(m["role"] == "assistant" for m in prompt)

    def split(completion: list[dict[str, str]]) -> tuple[list[Segment], list[Segment]]:
        messages = prompt + completion
        segments = chat_segments(messages, tokenizer)
        trained = [i for i, (_, t) in enumerate(segments) if t]
        # Segments before the completion's first assistant turn form the prompt; assistant turns
        # inside the prompt are context here, not trained on.
        cut = trained[assistant_turns]
        return [(text, False) for text, _ in segments[:cut]], segments[cut:]

    # The prompt's segments come from renderings of the prompt's messages alone (the chat
    # template of conversations cut before each assistant turn), so both sides share them.
    prompt_segments, chosen_segments = split(chosen)
    return prompt_segments, chosen_segments, split(rejected)[1]


def pair_segments(row: Mapping[str, Any], tokenizer: ChatTokenizer) -> PairSegments:
    """Renders one preference row (see the module docstring).

    Raises:
        ValueError: a field is missing or of the wrong type, or the layout is not one above.
    """
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise ValueError(f"missing '{key}' (preference rows need 'chosen' and 'rejected')")
    margin = _margin(row)
    values = [row.get(key) for key in COLUMNS]
    if all(isinstance(v, str) for v in values[1:]):
        if values[0] is None:
            raise ValueError(
                "missing 'prompt' (string completions need an explicit prompt; only message "
                "lists can share an implicit one)"
            )
        eos = tokenizer.eos_token or ""
        return PairSegments(
            [(text_field(row, "prompt"), False)],
            [(text_field(row, "chosen") + eos, True)],
            [(text_field(row, "rejected") + eos, True)],
            margin,
        )
    if not all(isinstance(v, list) for v in values[1:]) or not isinstance(
        values[0], list | str | None
    ):
        kinds = ", ".join(f"{k}: {type(v).__name__}" for k, v in zip(COLUMNS, values, strict=True))
        raise ValueError(
            f"'prompt', 'chosen' and 'rejected' must be all strings or all message lists ({kinds})"
        )
    chosen, rejected = check_messages(values[1], "chosen"), check_messages(values[2], "rejected")
    if not isinstance(values[0], list):
        prompt, chosen, rejected = split_prompt(chosen, rejected)
        if not prompt and isinstance(values[0], str):
            raise ValueError(
                "a string 'prompt' beside message lists is ignored (as TRL ignores it), and "
                "'chosen' and 'rejected' share no first messages to hold the prompt: give "
                "'prompt' as a list of messages"
            )
    else:
        prompt = check_messages(values[0], "prompt")
    return PairSegments(*_chat_pair(prompt, chosen, rejected, tokenizer), margin)
