"""The conversations the model continues: its first response, a critique against a principle,
a revision given the critique, and the judge's question. Each is a list of chat messages,
rendered with the model's chat template (or lorakit's built-in one) by the generator.

The critique and revision requests continue the conversation that produced the response, as a
user would ask them; a principle's few-shot examples come first, as earlier turns (after any
system message of the prompt, which stays first).
"""

from __future__ import annotations

from lorakit.constitutional.principles import Principle

Messages = list[dict[str, str]]

JUDGE_REQUEST = (
    "Here is a request and two possible answers.\n\nRequest:\n{prompt}\n\n(A) {first}\n\n"
    "(B) {second}\n\nWhich answer better follows this principle: {principle}\n"
    "Reply with the letter A or B only."
)


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def as_messages(raw: str | Messages) -> Messages:
    """A prompt as the data holds it (a string, or messages up to the answer) as messages."""
    return [_turn("user", raw)] if isinstance(raw, str) else [dict(m) for m in raw]


def _few_shot(principle: Principle) -> Messages:
    turns: Messages = []
    for ex in principle.examples:
        turns += [
            _turn("user", ex.prompt),
            _turn("assistant", ex.response),
            _turn("user", principle.critique),
            _turn("assistant", ex.critique),
            _turn("user", principle.revision),
            _turn("assistant", ex.revision),
        ]
    return turns


def critique_messages(prompt: Messages, response: str, principle: Principle) -> Messages:
    """The prompt, the response to critique and the principle's critique request."""
    system = [m for m in prompt[:1] if m["role"] == "system"]
    rest = prompt[len(system) :]
    return [
        *system,
        *_few_shot(principle),
        *rest,
        _turn("assistant", response),
        _turn("user", principle.critique),
    ]


def revision_messages(
    prompt: Messages, response: str, principle: Principle, critique: str
) -> Messages:
    """The critique conversation, the critique, and the principle's revision request."""
    return [
        *critique_messages(prompt, response, principle),
        _turn("assistant", critique),
        _turn("user", principle.revision),
    ]


def judge_messages(prompt: Messages, first: str, second: str, principle: Principle) -> Messages:
    """Asks which of two responses better follows ``principle``; answered with "A" or "B"."""
    request = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    question = JUDGE_REQUEST.format(
        prompt=request, first=first, second=second, principle=principle.critique
    )
    return [_turn("user", question)]
