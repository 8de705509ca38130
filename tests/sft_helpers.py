"""A tiny word-level tokenizer and Llama for the data, trainer and CLI tests."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.demo import build_tokenizer

WORDS = "the a capital of is what question answer : ? . hello world one two three four five six"


def tokenizer(extra: str = ""):
    return build_tokenizer([WORDS, extra])


def llama(tok, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


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
