"""Loading the model and tokenizer a recipe fine-tunes (local Hugging Face directories)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lorakit.models import gguf
from lorakit.peft.methods import MethodName, methods_help
from lorakit.validate import check_device

METHODS = get_args(MethodName)
# The --dtype choices that name a torch dtype ("auto" keeps the checkpoint's).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The scalar head of transformers' *ForSequenceClassification (Llama, GPT-2, Qwen, ...).
SCORE_HEAD = "score"


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    model: str = field(
        default="",
        metadata={
            "path": True,
            "help": "A Hugging Face causal LM and its tokenizer: a local directory, a hub id "
            "(owner/name: taken from the Hugging Face cache, downloaded there when missing "
            "and the network allows; safetensors weights only), or a .gguf file (converted "
            "once to a float32 directory under ~/.cache/lorakit/gguf; needs the gguf package).",
        },
    )
    method: MethodName = field(default="qlora", metadata={"help": methods_help()})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto keeps the checkpoint's (torch_dtype in config)."},
    )
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."}
    )

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device this machine lacks fails now, before any data
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")


# A Hugging Face hub id: "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# What a model directory needs from the hub: never pickled weights (*.bin), never other formats.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def model_dir(config: ModelConfig) -> Path:
    """``config.model`` as a directory holding a ``config.json``: a local directory, the
    snapshot of a Hugging Face hub id in the Hugging Face cache (downloaded there when it is
    not cached yet and the network allows; safetensors weights only), or a GGUF file's
    conversion (:func:`lorakit.models.gguf.converted_dir`).

    Raises:
        ValueError: it is neither a model directory nor a hub id that can be had (not cached,
            and the hub cannot be reached or has no such model), or an unreadable GGUF file.
    """
    path = Path(config.model)
    if gguf.is_gguf(config.model):
        return gguf.converted_dir(path)
    if config.model and (path / "config.json").is_file():
        return path
    if path.is_file():
        raise ValueError(
            f"{path} is a file, not a model directory (with config.json) nor a GGUF file "
            "(named *.gguf)"
        )
    if not config.model or path.exists() or not _HUB_ID.fullmatch(config.model):
        raise ValueError(f"model directory {path} does not exist or has no config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot = Path(snapshot_download(config.model, allow_patterns=_HUB_FILES))
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise ValueError(
            f"{config.model} is no local directory, and as a Hugging Face hub id it is not in "
            f"the local cache and cannot be downloaded (offline, or no such model): "
            f"{type(e).__name__}"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise ValueError(f"hub model {config.model} has no config.json")
    return snapshot


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names (``auto``: CUDA when available, else the CPU).

    Raises:
        ValueError: it is no device lorakit takes, or a CUDA device this machine lacks.
    """
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                "use cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name}: this machine has {count} CUDA device(s)")
    return device


def load_tokenizer(config: ModelConfig) -> Any:
    """The tokenizer of :func:`model_dir`.

    Raises:
        ValueError: the directory does not exist or holds no loadable tokenizer.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer

    path = model_dir(config)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except StrictDataclassError as e:
        raise _invalid_config(path, e) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None


def _invalid_config(path: Path, error: Exception) -> ValueError:
    """transformers' configs check their values as they are built (hidden size a multiple of
    the heads, ...), raising an error that is no ValueError."""
    return ValueError(f"{path / 'config.json'} is not a valid model configuration: {error}")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files that transformers loads from model directory ``path``: those its
    ``model.safetensors.index.json`` names, else ``model.safetensors`` (none if neither is
    there; other files in the directory are not the model's).

    Raises:
        ValueError: the index cannot be read, or the weights are pickle only.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(
                {path / name for name in json.loads(index.read_text())["weight_map"].values()}
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read the weights' index {index}: {e!r}") from None
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")):
        raise ValueError(
            f"{path} holds its weights as pickle (*.bin), which lorakit never loads (loading "
            "pickle can run code); convert them to safetensors"
        )
    return []


def _load(
    auto_class: Any, config: ModelConfig, what: str, new: str = "", **kwargs: Any
) -> nn.Module:
    """``auto_class.from_pretrained`` on :func:`model_dir`, safetensors only. The checkpoint
    may lack the weights of module ``new`` (started at random); a checkpoint lacking any other
    weights is refused: transformers would start them at random and only warn."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    path = model_dir(config)
    dtype = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    _weight_files(path)  # refuses pickle weights
    try:
        # Weights from safetensors only: a pickle can run code when it is loaded.
        model, info = auto_class.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    except StrictDataclassError as e:
        raise _invalid_config(path, e) from None
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"cannot load a {what} from {path}: {e}") from None
    missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] != new)
    if missing:
        raise ValueError(
            f"{path} has no weights for {len(missing)} of the {what}'s tensors ({missing[0]}"
            f"{', ...' if len(missing) > 1 else ''}): the checkpoint is incomplete or of "
            "another model"
        )
    # What adapters record as their base (base_model_name_or_path): the hub id, for a model
    # taken from the cache, as transformers records it.
    model.config._name_or_path = config.model
    return model.to(resolve_device(config.device))


def load_model(config: ModelConfig) -> nn.Module:
    """The causal LM of :func:`model_dir`, on ``config.device``.

    Raises:
        ValueError: the directory does not exist, holds no loadable causal LM, or lacks some
            of its weights.
    """
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, config, "causal LM")


def load_sequence_classifier(config: ModelConfig, pad_token_id: int) -> nn.Module:
    """A causal LM backbone with a scalar head ``score`` (hidden -> 1) on the last non-pad
    token: transformers' ``*ForSequenceClassification`` with one label, the layout reward
    models are saved and served in. The head is the checkpoint's when it has one, else freshly
    initialised (:func:`check_trained_head` refuses the latter beforehand where it matters).

    Raises:
        ValueError: the directory does not exist or its architecture has no such class.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    # transformers reports the new head and the unused lm_head as a load problem; here they are
    # what was asked for.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return _load(
            AutoModelForSequenceClassification,
            config,
            "sequence classifier (reward model)",
            new=SCORE_HEAD,
            num_labels=1,
            pad_token_id=pad_token_id,
        )
    finally:
        logging.set_verbosity(verbosity)


def check_trained_head(config: ModelConfig) -> None:
    """Refuses a model whose checkpoint holds no ``score`` head (a plain causal LM), whose
    scores would come from random weights; reads the weights' names from the safetensors
    headers only, so that it is cheap enough to run before anything else loads.

    Raises:
        ValueError: the directory does not exist, holds pickle weights, a safetensors file
            cannot be read, or no weight belongs to the head.
    """
    from safetensors import SafetensorError, safe_open

    path = model_dir(config)
    files = _weight_files(path)
    if not files:
        raise ValueError(
            f"{path} holds no model weights (model.safetensors, or the shards its "
            "model.safetensors.index.json names)"
        )
    names: set[str] = set()
    for file in files:
        try:
            with safe_open(file, "pt") as weights:  # the header: names, dtypes, shapes
                names.update(weights.keys())
        except (OSError, SafetensorError) as e:
            raise ValueError(f"cannot read the weights {file}: {e}") from None
    if not any(name.split(".")[0] == SCORE_HEAD for name in names):
        raise ValueError(
            f"{path} has no trained {SCORE_HEAD!r} head, so it is no reward model "
            "and its scores would come from random weights: use one that lorakit reward "
            "--method full or lorakit merge wrote, or its base with the reward adapter "
            "(--adapter in lorakit reward --score, --reward-adapter in lorakit ppo)"
        )


def pad_id(tokenizer: Any) -> int:
    """The token that pads batches: the tokenizer's pad token, else its end of sequence, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0
