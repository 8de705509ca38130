"""A tiny word-level tokenizer and Llama for the data, trainer and CLI tests."""

from pathlib import Path

from lorakit.models import tiny_llama, word_tokenizer

WORDS = "the a capital of is what question answer : ? . hello world one two three four five six"


def tokenizer(extra: str = ""):
    return word_tokenizer([WORDS, extra])


def llama(tok, hidden: int = 32, layers: int = 2, seed: int = 0):
    return tiny_llama(
        tok, hidden, layers, seed, intermediate=2 * hidden, heads=2, max_positions=128
    )


def saved_model(path: Path, extra: str = "") -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face directory."""
    tok = tokenizer(extra)
    llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def qa_rows(n: int) -> list[dict[str, str]]:
    """``n`` rows "question : what is one ?" -> " two" (the next number), cycling."""
    numbers = "one two three four five six".split()
    return [
        {"prompt": f"question : what is {numbers[i % 6]} ?", "completion": f" {numbers[i % 6 - 5]}"}
        for i in range(n)
    ]
