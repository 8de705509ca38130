"""Folding LoRA and IA3 adapters into the base weights: in place, or into a new model."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import ops
from lorakit.nn import AdapterLayer, IA3Linear, LoRALinear, NF4Linear
from lorakit.peft.adapters import adapter_layers, set_adapter
from lorakit.peft.files import write_json

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


def merge_adapter(model: nn.Module, name: str | None = None) -> int:
    """Adds adapter ``name`` (default: the active one) into the base weights, in place.

    Forward then costs what the base model costs. LoRA: ``W += s B A``; NF4 weights are quantized
    again, which changes the layer's output a little beyond the adapter (measured in
    tests/test_merge_model.py and the README); :func:`merge_and_export` avoids that by writing
    dense weights. IA3: W's rows (and the bias) are scaled by ``l``, or its columns for a
    feed-forward layer; NF4 weights are quantized again (rows keep their codes and move by the
    8-bit scales' rounding, columns by about one NF4 rounding: tests/test_ia3_nf4_merge.py).

    Returns:
        The number of layers merged.

    Raises:
        ValueError: an adapter is already merged, no layer holds the adapter, or some layer's
            adapter cannot be merged (prefix tuning, bottleneck, IA3 with a zero scale); the
            model is then unchanged.
    """
    if name is not None:
        set_adapter(model, name)
    layers = [layer for _, layer in adapter_layers(model) if layer.active_adapter in layer.settings]
    if not layers:
        raise ValueError("the model has no adapter layer holding the active adapter")
    merged = [layer.merged_adapter for layer in layers if layer.merged_adapter is not None]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is already merged; unmerge it first")
    for layer in layers:  # every check first, so that a refusal leaves the model as it was
        layer.check_merge(layer.active_adapter)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapter(model: nn.Module) -> int:
    """Takes the merged adapter out of the base weights again; returns the layers unmerged.

    Dense weights come back within a rounding or two of their dtype (IA3 divides by ``l``); NF4
    weights are quantized once more, so they come back within about one NF4 step (see the tests;
    an IA3 row scaled by ``|l|`` near 0 comes back with its 8-bit scale's error over ``|l|``).
    """
    layers = [layer for _, layer in adapter_layers(model) if layer.merged_adapter is not None]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merged_weight(layer: LoRALinear | IA3Linear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight with the active adapter folded in: float32 math, rounded to ``dtype``."""
    base = layer.base
    if isinstance(base, NF4Linear):
        weight = base.weight.dequantize(torch.float32)
    else:
        weight = base.weight.detach().to(torch.float32, copy=True)
    if layer.uses_adapter():
        name = layer.active_adapter
        if isinstance(layer, LoRALinear):
            scaling = layer.settings[name].scaling
            ops.lora_merge_(weight, layer.lora_A[name], layer.lora_B[name], scaling)
        else:  # IA3: an (out, 1) column scales rows, a (1, in) row scales columns
            weight *= layer.ia3_l[name].detach().to(torch.float32)
    return weight.to(dtype)


def merged_bias(layer: LoRALinear | IA3Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """The base bias, scaled by an IA3 output vector when one is active, rounded to ``dtype``."""
    bias = layer.base.bias
    if bias is None:
        return None
    bias = bias.detach().to(torch.float32)
    name = layer.active_adapter
    if isinstance(layer, IA3Linear) and layer.uses_adapter():
        if not layer.settings[name].feedforward:
            bias = bias * layer.ia3_l[name].detach().to(torch.float32).flatten()
    return bias.to(dtype)


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The state dict with each LoRA / IA3 layer replaced by a plain linear's merged weights.

    Keys are the bare model's (``...q_proj.weight``), so the result loads into the model class
    the adapters were applied to. Float tensors are cast to ``dtype`` when given.

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
    for name, layer in layers.items():
        if not isinstance(layer, LoRALinear | IA3Linear):
            continue  # an inactive prefix: the bare model has no such module
        weight_dtype = dtype or layer.base.weight.dtype
        state[f"{name}.weight"] = merged_weight(layer, weight_dtype)
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
        model: a transformers ``PreTrainedModel`` with LoRA layers.
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
