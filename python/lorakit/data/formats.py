"""Rows of a data file -> text segments, each marked as trained on (a response) or not (a prompt).

Formats (``auto`` picks by the row's columns, in this order):

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  rendered with the tokenizer's chat template, or :data:`BUILTIN_CHAT_TEMPLATE` when it has none.
  Only assistant turns are trained on.
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``, rendered with
  :data:`ALPACA_PROMPT`; only the output is trained on.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; only the completion is trained on.
- ``text``: ``{"text": str}``, for continued pre-training; every token is trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from jinja2 import TemplateError, TemplateSyntaxError

Format = Literal["auto", "chat", "alpaca", "prompt_completion", "text"]
FORMATS: tuple[str, ...] = ("auto", "chat", "alpaca", "prompt_completion", "text")
Segment = tuple[str, bool]  # (text, trained on)

# The prompt of Stanford Alpaca (Taori et al. 2023), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)

# Used when a tokenizer has no chat template: each turn is "<|role|>\n" + content + "\n", and an
# assistant turn ends with the tokenizer's EOS token so that the model learns to stop.
BUILTIN_CHAT_TEMPLATE = "<|{role}|>\n{content}{end}\n"
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A data row that cannot be used; the message names the row, counted from 1 (in a JSONL
    file without blank lines, its line number), and the reason. ``index`` counts from 0."""

    def __init__(self, source: str, index: int, reason: str) -> None:
        super().__init__(f"{source}: row {index + 1}: {reason}")


class ChatTokenizer(Protocol):
    chat_template: str | None
    eos_token: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def detect(row: Mapping[str, Any]) -> str:
    """The format of a row from its columns (see the module docstring)."""
    if "chosen" in row and "rejected" in row:
        raise ValueError(
            "the rows are preference pairs (chosen / rejected): train on them with lorakit dpo "
            "or lorakit reward (in Python: lorakit.data.prepare_preferences)"
        )
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise ValueError(
        f"cannot tell the format from the columns {sorted(row)}; expected 'messages' (chat), "
        "'instruction' + 'output' (alpaca), 'prompt' + 'completion', or 'text'"
    )


def text_field(row: Mapping[str, Any], key: str, optional: bool = False) -> str:
    """``row[key]`` as a string: non-blank, or possibly absent (``""``) when ``optional``."""
    value = row.get(key)
    if value is None and optional:
        return ""
    if value is None:
        # A key that other rows of the file have reads as null here (datasets fills it in).
        raise ValueError(f"'{key}' is missing" if key not in row else f"'{key}' is missing or null")
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise ValueError(f"'{key}' is empty")
    return value


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, str]]:
    """``messages`` as a list of ``{role, content}`` dicts (extra keys dropped).

    Raises:
        ValueError: not a non-empty list, or a message lacks a known role or string content.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{name}' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise ValueError(f"'{name}' message {i} needs a role among {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"'{name}' message {i} ({m['role']}) needs string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(
    messages: list[dict[str, str]], tokenizer: ChatTokenizer, generation_prompt: bool
) -> str:
    """``messages`` rendered with the tokenizer's chat template, as text.

    Raises:
        ValueError: the template does not parse, or refuses the conversation (templates raise
            for roles they do not support, e.g. a system turn, or turns that do not alternate).
    """
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateSyntaxError as e:
        raise ValueError(
            f"the tokenizer's chat template is not valid Jinja: {e} (line {e.lineno})"
        ) from None
    # Jinja expressions run Python operations: `content + 1`, `1 / 0`, `'a'.index('z')` or a
    # macro calling itself raise Python's errors.
    except (
        TemplateError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        RecursionError,
    ) as e:
        raise ValueError(
            f"the tokenizer's chat template fails on this conversation: "
            f"{e if isinstance(e, TemplateError) else repr(e)}"
        ) from None


def _chat_builtin(messages: list[dict[str, str]], eos: str) -> list[Segment]:
    segments: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            segments.append(("<|assistant|>\n", False))
            segments.append((m["content"] + eos, True))
            segments.append(("\n", False))
        else:
            turn = BUILTIN_CHAT_TEMPLATE.format(role=m["role"], content=m["content"], end="")
            segments.append((turn, False))
    return segments


def _chat_template(messages: list[dict[str, str]], tokenizer: ChatTokenizer) -> list[Segment]:
    # Each assistant turn is the difference between the conversation rendered through that turn
    # and the conversation before it with the generation prompt: the template's own markup for
    # the turn's end is trained on (so the model learns to stop), its header is not.
    def render(upto: int, generation_prompt: bool) -> str:
        return render_chat(messages[:upto], tokenizer, generation_prompt)

    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, through = render(i, True), render(i + 1, False)
        if not (prefix.startswith(done) and through.startswith(prefix)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations as growing "
                "prefixes, so assistant turns cannot be located; use a prompt/completion file"
            )
        if through == prefix:
            raise ValueError(
                f"the tokenizer's chat template renders no text for message {i} (assistant)"
            )
        segments += [(prefix[len(done) :], False), (through[len(prefix) :], True)]
        done = through
    rest = render(len(messages), False)[len(done) :]
    return [s for s in [*segments, (rest, False)] if s[0]]


def chat_segments(messages: list[dict[str, str]], tokenizer: ChatTokenizer) -> list[Segment]:
    """Checked messages (:func:`check_messages`) rendered with the tokenizer's chat template, or
    the built-in one; each assistant turn is one trained segment, ending the turn as the
    template does (the built-in template ends it with EOS)."""
    if tokenizer.chat_template:
        return _chat_template(messages, tokenizer)
    return _chat_builtin(messages, tokenizer.eos_token or "")


def to_segments(row: Mapping[str, Any], fmt: str, tokenizer: ChatTokenizer) -> list[Segment]:
    """Renders one row as ``(text, trained)`` segments, ending with the tokenizer's EOS token.

    Raises:
        ValueError: the row lacks a field of its format or a field has the wrong type.
    """
    fmt = detect(row) if fmt == "auto" else fmt
    # The EOS token ends every response (and every document) so the model learns to stop.
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        return [(text_field(row, "text") + eos, True)]
    if fmt == "prompt_completion":
        return [(text_field(row, "prompt"), False), (text_field(row, "completion") + eos, True)]
    if fmt == "alpaca":
        extra = text_field(row, "input", optional=True)
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=text_field(row, "instruction"),
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return [(prompt, False), (text_field(row, "output") + eos, True)]
    if fmt == "chat":
        messages = check_messages(row.get("messages"))
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to train on")
        return chat_segments(messages, tokenizer)
    raise ValueError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
