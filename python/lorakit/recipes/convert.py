"""``lorakit convert --gguf FILE --out DIR``: a GGUF model (llama.cpp's format) as a plain
Hugging Face model directory (safetensors + tokenizer) that every lorakit command, transformers
and PEFT load. The weights are dequantized: a Q4 file becomes a float directory several times
its size. (``--model file.gguf`` does the same once into a cache directory.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.model_dirs import check_replaceable
from lorakit.models import DTYPES
from lorakit.models.gguf import is_gguf, write_model_dir

REQUIRED = frozenset({"gguf", "out"})


@dataclass
class ConvertConfig:
    """Which GGUF file to convert, and where to."""

    gguf: str = field(
        default="", metadata={"path": True, "help": "The .gguf file (needs the gguf package)."}
    )
    out: str = field(
        default="", metadata={"path": True, "help": "Directory to write the model and tokenizer."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype of the written weights."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace --out if it is a model directory (has a config.json); a directory "
            "of other files is never replaced."
        },
    )


def run(config: ConvertConfig) -> Path:
    """Writes ``config.gguf`` converted to ``config.out`` (atomically).

    Raises:
        ValueError, FileExistsError: a user mistake (see the messages).
    """
    source, out = Path(config.gguf), Path(config.out)
    if not is_gguf(config.gguf):
        raise ValueError(f"--gguf {source} is not a .gguf file")
    check_replaceable(out, config.overwrite, (source,))
    return write_model_dir(source, out, DTYPES[config.dtype], config.overwrite)


def main(config: ConvertConfig) -> str:
    """``lorakit convert``: what it prints when done."""
    return f"model and tokenizer written to {run(config)}"
