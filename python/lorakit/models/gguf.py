"""GGUF files (llama.cpp's format) as plain Hugging Face model directories.

transformers reads a GGUF file (with the ``gguf`` package) and dequantizes its weights to float,
but marks the model quantized, so it cannot be saved or trained as it is. Here the weights are
moved into a fresh model of the same configuration without the quantization mark, which saves as
an ordinary directory (safetensors + tokenizer) that everything else in lorakit loads.

``--model file.gguf`` converts once into a cache directory (:func:`converted_dir`), keyed by the
file's path, size and modification time; ``lorakit convert --gguf`` writes one where you say.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.model_dirs import replaced_atomically
from lorakit.paths import make_dirs

SUFFIX = ".gguf"


def is_gguf(model: str) -> bool:
    """Whether ``--model`` names a GGUF file (by its suffix)."""
    return model.lower().endswith(SUFFIX)


def cache_root() -> Path:
    """Where converted GGUF models are kept: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``,
    else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorakit"


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"GGUF file {path} is a directory")
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF through it
        raise ValueError(f"reading {path} needs the gguf package: pip install gguf")


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The causal LM and tokenizer a GGUF file holds, dequantized to ``dtype``, as a plain
    (unmarked, savable, trainable) transformers model on the CPU.

    Raises:
        ValueError: no such file, no gguf package, or a file transformers cannot read.
    """
    _check_file(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its progress bar and "dequantizing" notice: asked for here
    # transformers draws the conversion's bar with plain tqdm, beyond the reach of its progress
    # switch (which the CLI turns off without --progress): then the bar's stderr goes nowhere.
    shown = logging.is_progress_bar_enabled()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with contextlib.nullcontext() if shown else contextlib.redirect_stderr(io.StringIO()):
            # dequantize=True: plain float weights whether or not a GGUF matmul kernel is there.
            quantized = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
            )
    except Exception as e:  # the reader raises anything from struct.error to KeyError
        raise ValueError(f"cannot read {path} as a GGUF model: {type(e).__name__}: {e}") from None
    finally:
        logging.set_verbosity(verbosity)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # files with quantized tensors are marked
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in quantized.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval(), tokenizer


def write_model_dir(
    path: Path, out: Path, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """Writes the model and tokenizer of GGUF file ``path`` to directory ``out`` (safetensors,
    config, tokenizer), atomically: ``out`` is complete or not there (an old model directory is
    replaced, with ``overwrite``, only once the new one is written; see
    :func:`lorakit.model_dirs.replaced_atomically`).

    Raises:
        ValueError: see :func:`load_gguf`.
    """
    model, tokenizer = load_gguf(path, dtype)
    with replaced_atomically(out, overwrite, (path,)) as new:
        model.save_pretrained(new)
        tokenizer.save_pretrained(new)
    return out


def converted_dir(path: Path) -> Path:
    """A model directory holding GGUF file ``path`` converted (float32), from the cache
    (:func:`cache_root`), converting it there first if it is not yet.

    Raises:
        ValueError: see :func:`load_gguf`.
    """
    _check_file(path)
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    make_dirs(cache_root(), f"the lorakit cache {cache_root()} (LORAKIT_CACHE)")
    target = cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(key).hexdigest()[:16]}"
    if not (target / "config.json").is_file():
        write_model_dir(path, target, overwrite=True)
    return target
