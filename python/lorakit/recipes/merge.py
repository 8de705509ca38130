"""``lorakit merge``: fold a saved adapter into its base model and write a plain Hugging Face
model directory (what one serves after ``lorakit sft``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.model_dirs import check_replaceable, replaced_atomically
from lorakit.models import (
    DTYPES,
    ModelConfig,
    load_model,
    load_sequence_classifier,
    load_tokenizer,
    pad_id,
)
from lorakit.nn import IA3Linear, LoRALinear
from lorakit.peft import load_adapter, merge_and_export
from lorakit.peft.adapter_io import FORMATS
from lorakit.peft.files import read_adapter_config

# Options with no useful default.
REQUIRED = {"model", "adapter", "out"}
# Layers whose adapter is a change to an existing weight, which merged_state_dict folds in.
MERGEABLE = (LoRALinear, IA3Linear)
# Why the other methods' adapters have no merged form: they add computation, not a weight delta.
WHY_NOT = {
    "PREFIX_TUNING": "a prefix adds learned keys and values to every attention layer",
    "LORAKIT_BOTTLENECK": "a bottleneck adapter adds a nonlinear block (down, activation, up)",
}


@dataclass
class MergeConfig:
    """Which adapter to merge into which base, and where the merged model goes."""

    model: str = field(
        default="",
        metadata={
            "path": True,
            "help": "Local directory of the base causal LM and its tokenizer (the one the adapter "
            "was trained on; for a QLoRA adapter the dense checkpoint, which is what "
            "base_model_name_or_path names, so the merge goes into the unquantized weights).",
        },
    )
    adapter: str = field(
        default="",
        metadata={
            "path": True,
            "help": "Adapter directory (adapter_config.json + adapter_model.safetensors).",
        },
    )
    out: str = field(
        default="",
        metadata={"path": True, "help": "Directory to write the merged model and tokenizer to."},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "Dtype of the written weights: auto keeps the checkpoint's."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "Where to merge: cpu, cuda, cuda:N, or auto (cuda when available)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace --out if it is a model directory (has a config.json); a directory "
            "of other files is never replaced."
        },
    )


def check_mergeable(adapter_dir: Path) -> str:
    """The adapter's ``peft_type``, once its folder is known to hold a mergeable adapter.

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` is missing.
        ValueError: the config is corrupt, or the method's adapters cannot be merged.
    """
    config = read_adapter_config(adapter_dir)
    peft_type = config.get("peft_type")
    adapter_format = FORMATS.get(peft_type) if isinstance(peft_type, str) else None
    if adapter_format is None:
        return str(peft_type)  # load_adapter names the known types
    if not issubclass(adapter_format.layer, MERGEABLE):
        why = WHY_NOT.get(peft_type, "it adds modules rather than changing existing weights")
        raise ValueError(
            f"{adapter_dir} holds a {peft_type} adapter, which cannot be merged: {why}, not a "
            "change to any weight; load it with lorakit.load_adapter instead"
        )
    return peft_type


def run(config: MergeConfig) -> Path:
    """Loads ``config.model`` and its tokenizer, loads and merges ``config.adapter``, and writes
    the merged model to ``config.out`` (atomically: complete or not at all).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: a user mistake (see the messages).
    """
    out = Path(config.out)
    inputs = (Path(config.model), Path(config.adapter))
    check_replaceable(out, config.overwrite, inputs)
    check_mergeable(Path(config.adapter))
    # Merge from the checkpoint's own dtype (float32 math) and round once, on export.
    base = ModelConfig(model=config.model, dtype="auto", device=config.device)
    tokenizer = load_tokenizer(base)
    # A reward model's adapter (PEFT's SEQ_CLS) goes on the backbone with its score head.
    task = read_adapter_config(Path(config.adapter)).get("task_type")
    if task == "SEQ_CLS":
        model = load_sequence_classifier(base, pad_id(tokenizer))
    else:
        model = load_model(base)
    try:
        load_adapter(model, config.adapter)
    except ValueError as e:  # corrupt files, or modules / shapes that do not fit this base
        raise ValueError(f"adapter {config.adapter} does not load into {config.model}: {e}") from e
    dtype = None if config.dtype == "auto" else DTYPES[config.dtype]
    with replaced_atomically(out, config.overwrite, inputs) as new:
        merge_and_export(model, new, dtype=dtype, tokenizer=tokenizer)
    return out
