"""Prompts for rollouts (PPO, GRPO): rows with a ``prompt`` column, or chat ``messages`` whose
final assistant turn (if any) is dropped, rendered as the model will continue them.

- ``{"prompt": str, ...}``: the text as it is (no chat template), as SFT's prompt / completion
  rows render their prompt.
- ``{"messages": [...], ...}``: the conversation up to its last non-assistant turn, with the
  tokenizer's chat template and its generation prompt, or the built-in template followed by
  ``<|assistant|>\\n`` (where SFT trained the answer to start).

Every other column of a row is kept beside the prompt (e.g. a reference ``answer`` for a
verifiable reward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.formats import (
    BUILTIN_CHAT_TEMPLATE,
    ChatTokenizer,
    RowError,
    check_messages,
    render_chat,
    text_field,
)
from lorakit.data.load import load_rows


@dataclass(frozen=True)
class Prompt:
    """One rollout prompt."""

    raw: str | list[dict[str, str]]
    """As the data holds it: the ``prompt`` string or the messages before the answer."""
    text: str
    """Rendered for the model (template and generation prompt applied)."""
    columns: dict[str, Any] = field(default_factory=dict)
    """The row's other columns."""


def render_messages(messages: list[dict[str, str]], tokenizer: ChatTokenizer) -> str:
    """The conversation rendered up to where the assistant's answer begins."""
    if tokenizer.chat_template:
        return render_chat(messages, tokenizer, generation_prompt=True)
    turns = (
        BUILTIN_CHAT_TEMPLATE.format(role=m["role"], content=m["content"], end="") for m in messages
    )
    return "".join(turns) + "<|assistant|>\n"


def to_prompt(row: dict[str, Any], tokenizer: ChatTokenizer) -> Prompt:
    """One row as a :class:`Prompt` (see the module docstring).

    Raises:
        ValueError: neither a non-empty ``prompt`` string nor ``messages`` with a turn before
            the answer.
    """
    # A file mixing both layouts reads back with None in the column a row lacks.
    rest = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if row.get("prompt") is not None:
        raw: str | list[dict[str, str]] = text_field(row, "prompt")
        text = raw
    elif row.get("messages") is not None:
        messages = check_messages(row["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("'messages' has no turn before the assistant's answer")
        raw, text = messages, render_messages(messages, tokenizer)
    else:
        raise ValueError(
            f"a prompt row needs a 'prompt' string or chat 'messages'; found {sorted(row)}"
        )
    return Prompt(raw, text, rest)


def load_prompts(paths: list[str], tokenizer: ChatTokenizer) -> list[Prompt]:
    """Every row of ``paths`` (see :func:`lorakit.data.load_rows`) as a :class:`Prompt`.

    Raises:
        ValueError: no path, no rows, or a bad row (named by file and row).
    """
    if not paths:
        raise ValueError("missing --data (prompt rows)")
    prompts: list[Prompt] = []
    for path in paths:
        for index, row in enumerate(load_rows(path)):
            try:
                prompts.append(to_prompt(dict(row), tokenizer))
            except ValueError as e:
                raise RowError(str(Path(path)), index, str(e)) from None
    if not prompts:
        raise ValueError(f"no prompt rows in {', '.join(paths)}")
    return prompts
