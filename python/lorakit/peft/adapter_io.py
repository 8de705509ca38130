"""save_adapter / load_adapter for every method: save by what the model holds, load by the
``peft_type`` in ``adapter_config.json``.

Each method brings its own writer and reader (``lora_io``, ``ia3_io``, ``prefix_io``,
``bottleneck_io``); this module only picks one. A new method plugs in with one entry in
:data:`FORMATS` (or a call to :func:`register_format`), as bottleneck adapters do with
``"LORAKIT_BOTTLENECK": AdapterFormat(BottleneckBlock, save_bottleneck, load_bottleneck)``, a
format of lorakit's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.nn import AdapterLayer, BottleneckBlock, IA3Linear, LoRALinear
from lorakit.nn.prefix import KVPrefix
from lorakit.peft.adapters import active_adapter, adapter_layers, adapter_names
from lorakit.peft.base_record import BASE_NAME
from lorakit.peft.bottleneck_io import PEFT_TYPE as BOTTLENECK_TYPE
from lorakit.peft.bottleneck_io import load_bottleneck, save_bottleneck
from lorakit.peft.files import CONFIG_NAME, read_adapter_config
from lorakit.peft.ia3_io import load_ia3, save_ia3
from lorakit.peft.lora_io import load_lora, save_lora
from lorakit.peft.prefix_io import load_prefix, save_prefix


@dataclass(frozen=True)
class AdapterFormat:
    """How one method's adapters are found in a model and written to / read from a folder.

    Attributes:
        layer: the :class:`~lorakit.nn.AdapterLayer` class that holds the method's adapters.
        save: ``save(model, out_dir, name)`` writes adapter ``name`` (which some ``layer`` holds).
        load: ``load(model, in_dir, config, name, trainable) -> loaded module names``, with
            ``config`` the parsed ``adapter_config.json``; checks everything before changing
            the model, and ends with :func:`lorakit.peft.adapters.finish_load`.
    """

    layer: type[AdapterLayer]
    save: Callable[[nn.Module, Path, str], None]
    load: Callable[[nn.Module, Path, dict[str, Any], str, bool], list[str]]


# peft_type in adapter_config.json -> its format. PEFT's names where PEFT reads the files;
# LORAKIT_* for formats of lorakit's own (PEFT has no bottleneck adapters).
FORMATS: dict[str, AdapterFormat] = {
    "LORA": AdapterFormat(LoRALinear, save_lora, load_lora),
    "IA3": AdapterFormat(IA3Linear, save_ia3, load_ia3),
    "PREFIX_TUNING": AdapterFormat(KVPrefix, save_prefix, load_prefix),
    BOTTLENECK_TYPE: AdapterFormat(BottleneckBlock, save_bottleneck, load_bottleneck),
}


def register_format(peft_type: str, adapter_format: AdapterFormat) -> None:
    """Makes :func:`save_adapter` / :func:`load_adapter` handle another method's adapters."""
    FORMATS[peft_type] = adapter_format


def save_adapter(model: nn.Module, out_dir: str | Path, name: str | None = None) -> Path:
    """Writes adapter ``name`` (default: the active one) as ``adapter_config.json`` +
    ``adapter_model.safetensors``, in PEFT's format for LoRA, IA3 and prefix tuning (lorakit's
    own, ``LORAKIT_BOTTLENECK``, for bottleneck adapters).

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads the result. Each file is written
    under a temporary name and renamed into place.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: no layer holds that adapter, its layers belong to several methods (a PEFT
            folder holds one), or the method's writer refuses it.
    """
    out = Path(out_dir)
    name = name or active_adapter(model)
    layers = [layer for _, layer in adapter_layers(model)]
    if not layers:
        raise ValueError(
            "the model has no adapter to save: add one first (apply_lora, apply_ia3, ...)"
        )
    holders = [f for f in FORMATS.values() if any(isinstance(x, f.layer) for x in layers)]
    owners = [
        f for f in holders if any(isinstance(x, f.layer) and name in x.settings for x in layers)
    ]
    if not owners:
        kinds = " or ".join(f.layer.method for f in holders) or "adapter"
        raise ValueError(
            f"no {kinds} layer holds an adapter named {name!r}; the model has "
            f"{adapter_names(model)}"
        )
    if len(owners) > 1:
        methods = [f.layer.method for f in owners]
        raise ValueError(
            f"adapter {name!r} spans several methods ({', '.join(methods)}); one folder holds "
            "one method's adapter"
        )
    owners[0].save(model, out, name)
    if owners[0] is not FORMATS["LORA"]:  # a LoRA adapter's record, left by an earlier save
        (out / BASE_NAME).unlink(missing_ok=True)
    return out


def load_adapter(
    model: nn.Module, in_dir: str | Path, name: str = "default", trainable: bool = False
) -> list[str]:
    """Loads an adapter saved by PEFT or :func:`save_adapter` into ``model`` as ``name``.

    The method comes from ``adapter_config.json``'s ``peft_type`` (LORA, IA3, PREFIX_TUNING,
    LORAKIT_BOTTLENECK, and any registered in :data:`FORMATS`). LoRA and IA3 layers and
    bottleneck sub-blocks are wrapped, or get one more adapter; a prefix is attached to the
    model. The model's active adapter stays active (a model without
    adapters activates this one). Every parameter outside the adapters is frozen. Everything is
    checked before the model is touched, so an error leaves it as it was.

    Args:
        model: the bare base model (not a PEFT wrapper).
        in_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the name to give the adapter (see :func:`lorakit.set_adapter`).
        trainable: let the loaded adapter's parameters train.

    Returns:
        The names of the modules that got the adapter.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is corrupt, the method is unknown, or the method's reader refuses the
            files (unsupported options, keys or shapes that do not fit ``model``, a name taken).
    """
    folder = Path(in_dir)
    config = read_adapter_config(folder)
    peft_type = config.get("peft_type")
    adapter_format = FORMATS.get(peft_type) if isinstance(peft_type, str) else None
    if adapter_format is None:
        raise ValueError(
            f"{folder / CONFIG_NAME}: peft_type {peft_type!r} is not one lorakit reads "
            f"({', '.join(sorted(FORMATS))})"
        )
    return adapter_format.load(model, folder, config, name, trainable)
