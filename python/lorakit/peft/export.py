"""Writing a model with its adapter merged: the merged state dict and a loadable folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.nn import AdapterLayer, IA3Linear, LoRALinear
from lorakit.peft.adapters import adapter_layers
from lorakit.peft.files import write_json
from lorakit.peft.inject import Conv1D
from lorakit.peft.merge import merged_bias, merged_weight

# Files a Hugging Face tokenizer may consist of, copied from the base model's folder on export.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def conv1d_layers(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The layers among ``names`` that ``model``'s class builds as transformers' ``Conv1D``.

    Adapters replace a ``Conv1D`` (GPT-2) by a linear layer holding ``Wᵀ``, so the adapted model
    no longer says which layers its checkpoint stores as ``(in, out)``; the class, rebuilt from
    the config on the meta device (no memory, no init), does.
    """
    config = getattr(model, "config", None)
    if Conv1D is None or config is None or not hasattr(model, "save_pretrained"):
        return set()  # not a transformers model: nothing to rebuild, no Conv1D
    with torch.device("meta"):
        bare = type(model)(config)
    modules = dict(bare.named_modules())
    return {name for name in names if isinstance(modules.get(name), Conv1D)}


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The state dict with each LoRA / IA3 layer replaced by a plain linear's merged weights.

    Keys and layouts are the bare model's (``...q_proj.weight``; GPT-2's ``Conv1D`` weights
    transposed back to ``(in, out)``), so the result loads into the model class the adapters
    were applied to. Float tensors are cast to ``dtype`` when given.

    Raises:
        ValueError: an active adapter of the model cannot be merged (prefix tuning).
    """
    layers: dict[str, AdapterLayer] = dict(adapter_layers(model))
    unmergeable = [
        layer.method
        for layer in layers.values()
        if layer.uses_adapter() and not isinstance(layer, LoRALinear | IA3Linear)
    ]
    if unmergeable:
        raise ValueError(f"{unmergeable[0]} adapters cannot be merged into the base weights")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if not any(key.startswith(f"{name}.") for name in layers):
            state[key] = (
                tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
            )
    transposed = conv1d_layers(model, layers)
    for name, layer in layers.items():
        if not isinstance(layer, LoRALinear | IA3Linear):
            continue  # an inactive prefix: the bare model has no such module
        weight_dtype = dtype or layer.base.weight.dtype
        weight = merged_weight(layer, weight_dtype)
        state[f"{name}.weight"] = weight.t().contiguous() if name in transposed else weight
        bias = merged_bias(layer, weight_dtype)
        if bias is not None:
            state[f"{name}.bias"] = bias
    return state


def merge_and_export(
    model: nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Writes ``model`` with its active adapter merged as a plain Hugging Face model.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result: safetensors
    (sharded above ``max_shard_size``), the config, and the tokenizer (``tokenizer`` if given,
    else the tokenizer files found beside the base model). NF4 layers are written dense, merged
    in float32, so the export carries no requantization error. The model itself is not changed.
    The folder appears complete or not at all (written under a temporary name, then renamed).

    Args:
        model: a transformers ``PreTrainedModel`` with LoRA or IA3 layers (GPT-2 included).
        out_dir: a folder that does not exist yet, or an empty one.
        dtype: the dtype of the exported weights (default: each weight's original dtype), e.g.
            ``torch.bfloat16`` for serving.
        tokenizer: anything with ``save_pretrained(folder)``.
        max_shard_size: as in ``PreTrainedModel.save_pretrained``.

    Raises:
        TypeError: ``model`` is not a transformers model.
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"merge_and_export needs a transformers model, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = merged_state_dict(model, dtype)
        model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if dtype is not None:
            config = json.loads((tmp / "config.json").read_text())
            write_json(tmp / "config.json", config | {"dtype": str(dtype).removeprefix("torch.")})
        _save_tokenizer(model, tokenizer, tmp)
        tmp.replace(out)  # rename(2) replaces an empty folder atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_tokenizer(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        return
    source = getattr(model.config, "_name_or_path", None)
    if source and Path(source).is_dir():
        for name in _TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, folder / name)
