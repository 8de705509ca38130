"""Reading and writing adapter files: atomic writes, safetensors only (pickle is never loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from lorakit.file_writes import write_atomic, write_text_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's prefix of a tensor key of an adapter inside the bare model's module ``<module>``.
PREFIX = "base_model.model."


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``*ForSequenceClassification`` (a reward model)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return type(model).__name__ in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: CAUSAL_LM, SEQ_CLS, or None for other models."""
    if is_causal_lm(model):
        return "CAUSAL_LM"
    return "SEQ_CLS" if is_sequence_classifier(model) else None


def peft_header(model: nn.Module, peft_type: str) -> dict[str, Any]:
    """The fields every PEFT adapter config starts with, for an adapter of ``model``."""
    model_config = getattr(model, "config", None)
    return {
        "peft_type": peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share memory or are not contiguous: give it plain copies.
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda p: safetensors.torch.save_file(plain, p, metadata={"format": "pt"}))


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``folder``'s ``adapter_config.json``.

    Raises:
        FileNotFoundError: ``folder`` is a file or missing (named, rather than the config it
            lacks), or it has no config.
        ValueError: the config is not a JSON object.
    """
    if not folder.is_dir():
        what = "is a file, not an adapter directory" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"{folder} {what} (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return read_json(folder / CONFIG_NAME)


def read_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object; a missing or unreadable file is a ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(path: Path, weights: bool = True) -> dict[str, torch.Tensor]:
    """Reads a safetensors file on the CPU; a missing or corrupt file is a clear error.

    Args:
        weights: the file holds weights: refuse integer tensors and NaN or infinite values,
            which would load (and merge) silently into a model that computes nothing useful.
    """
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("*.bin")]
        hint = f" ({pickled} found: pickle files are never loaded)" if pickled else ""
        raise FileNotFoundError(f"{path} does not exist{hint}")
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if weights:
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise ValueError(f"{path}: {key} is {tensor.dtype}, not a floating-point weight")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return tensors
