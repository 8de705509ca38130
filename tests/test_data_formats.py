"""Row formats -> segments -> token ids and loss masks, against hand-computed expectations."""

import pytest

from lorakit.data import IGNORE, encode, to_segments
from lorakit.data.formats import ALPACA_PROMPT, detect
from sft_helpers import tokenizer

TOK = tokenizer("user assistant system <|user|> <|assistant|> <|system|> instruction input")
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_trains_on_the_completion_and_eos_only() -> None:
    row = {"prompt": "what is one ?", "completion": " two"}
    assert to_segments(row, "auto", TOK) == [("what is one ?", False), (" two</s>", True)]
    ex = encode(to_segments(row, "auto", TOK), TOK)
    two, eos, bos = ids("two")[0], TOK.eos_token_id, TOK.bos_token_id
    assert ex.input_ids == [bos, *ids("what is one ?"), two, eos]
    assert ex.labels == [IGNORE] * 5 + [two, eos]
    assert ex.trained_tokens == 2


def test_text_trains_on_every_token_but_the_first() -> None:
    ex = encode(to_segments({"text": "hello world"}, "auto", TOK), TOK)
    assert ex.input_ids == [TOK.bos_token_id, *ids("hello world"), TOK.eos_token_id]
    # Nothing predicts the first token.
    assert ex.labels == [IGNORE, *ids("hello world"), TOK.eos_token_id]


def test_alpaca_renders_the_stanford_prompt() -> None:
    row = {"instruction": "say hello", "input": "", "output": "hello"}
    segments = to_segments(row, "auto", TOK)
    prompt = ALPACA_PROMPT.format(ctx="", instruction="say hello", input="")
    assert segments == [(prompt, False), ("hello</s>", True)]
    with_input = to_segments({**row, "input": "world"}, "alpaca", TOK)[0][0]
    assert "### Input:\nworld\n\n### Response:\n" in with_input
    assert "paired with an input" in with_input


def test_chat_with_the_tokenizers_template_trains_on_assistant_turns() -> None:
    tok = tokenizer("user assistant system")
    tok.chat_template = TEMPLATE
    messages = [
        {"role": "system", "content": "one"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "three"},
    ]
    segments = to_segments({"messages": messages}, "auto", tok)
    assert segments == [
        ("system : one </s> user : hello </s> assistant : ", False),
        ("world </s> ", True),
        ("user : two </s> assistant : ", False),
        ("three </s> ", True),
    ]
    ex = encode(segments, tok)
    trained = [t for t in ex.labels if t != IGNORE]
    world, three = tok.convert_tokens_to_ids(["world", "three"])
    assert trained == [world, tok.eos_token_id, three, tok.eos_token_id]


def test_chat_without_a_template_uses_the_builtin_one() -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert to_segments({"messages": messages}, "chat", TOK) == [
        ("<|user|>\nhello\n", False),
        ("<|assistant|>\n", False),
        ("world</s>", True),
        ("\n", False),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "completion": 3}, "'completion' must be a string"),
        ({"prompt": " ", "completion": "a"}, "'prompt' is empty"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "needs a role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"question": "x"}, "cannot tell the format"),
    ],
)
def test_malformed_rows_say_why(row, message) -> None:
    with pytest.raises(ValueError, match=message):
        to_segments(row, "auto", TOK)


def test_a_format_whose_column_the_row_lacks_names_it() -> None:
    # --format text on prompt / completion rows (it said "'text' must be a string, got NoneType").
    with pytest.raises(ValueError, match=r"^'text' is missing$"):
        to_segments({"prompt": "a", "completion": "b"}, "text", TOK)
    with pytest.raises(ValueError, match=r"^'text' is missing or null$"):
        to_segments({"text": None}, "text", TOK)


def test_detect_prefers_messages_then_alpaca() -> None:
    assert detect({"messages": [], "text": "x"}) == "chat"
    assert detect({"instruction": "x", "output": "y", "text": "z"}) == "alpaca"
