"""Loading models and tokenizers, and the tiny models the demo and tests build."""

from lorakit.models.loading import (
    DTYPES,
    ModelConfig,
    check_trained_head,
    load_model,
    load_sequence_classifier,
    load_tokenizer,
    model_dir,
    pad_id,
    resolve_device,
)
from lorakit.models.tiny import tiny_llama, word_tokenizer

__all__ = [
    "DTYPES",
    "ModelConfig",
    "check_trained_head",
    "load_model",
    "load_sequence_classifier",
    "load_tokenizer",
    "model_dir",
    "pad_id",
    "resolve_device",
    "tiny_llama",
    "word_tokenizer",
]
