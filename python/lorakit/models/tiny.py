"""The demo's tiny word-level tokenizer and Llama, built on the spot (nothing downloaded).

The demo, ``lorakit compare`` and the tests build their small models here, so that there is one
definition of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def word_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level tokenizer trained on ``texts`` (``tokenizers``, whitespace-split words), with
    ``<pad>``, ``<unk>``, ``<s>`` and ``</s>`` as its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[*SPECIAL.values()]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def check_width(hidden: int, heads: int | None = None) -> int:
    """The attention heads of a :func:`tiny_llama` of width ``hidden`` (``heads``, or one per
    32 of width).

    Raises:
        ValueError: ``hidden`` does not split into that many heads of even width (RoPE rotates
            pairs of dimensions).
    """
    heads = heads or max(1, hidden // 32)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(
            f"hidden {hidden} does not split into {heads} attention head(s) of even width; "
            "use an even width below 64 or a multiple of 32"
        )
    return heads


def tiny_llama(
    tokenizer: Any,
    hidden: int = 128,
    layers: int = 4,
    seed: int = 0,
    intermediate: int | None = None,
    heads: int | None = None,
    max_positions: int = 64,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` for ``tokenizer``'s vocabulary, seeded.

    Args:
        hidden: model width.
        layers: decoder layers.
        intermediate: MLP width (default ``8/3 * hidden``, Llama's ratio).
        heads: attention heads, as many key / value heads (default one per 32 of width).
        max_positions: longest sequence.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = check_width(hidden, heads)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)
