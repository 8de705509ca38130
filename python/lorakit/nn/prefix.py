"""Prefix tuning: learned keys and values that every attention layer sees before the input."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.nn.adapter_layer import AdapterLayer


@dataclass(frozen=True)
class PrefixShape:
    """The attention geometry a prefix must match: one key and one value per layer and KV head."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Values per virtual token: ``num_layers * 2 * num_kv_heads * head_dim`` (PEFT's)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class PrefixSettings:
    """The hyperparameters of one adapter of a :class:`KVPrefix`."""

    num_virtual_tokens: int
    init: Literal["normal", "zero"] = "normal"


class KVPrefix(AdapterLayer):
    """Prefix tuning (Li & Liang 2021) for a Hugging Face causal LM, several prefixes by name.

    Adapter ``name`` is one tensor ``embedding[name]`` of shape ``[T, num_layers * 2 * kv_heads *
    head_dim]`` (PEFT's ``prompt_embeddings`` without projection), read per token as
    ``[num_layers, (key, value), kv_heads, head_dim]``. The module sits on the model and
    :meth:`inject` runs before the model's forward (a forward pre-hook): it passes the prefix as
    ``past_key_values`` (a ``transformers.DynamicCache`` whose layer ``l`` holds the prefix's keys
    and values), prepends ``T`` ones to ``attention_mask`` and shifts ``position_ids`` by ``T``,
    so every attention layer attends to ``T`` learned positions before the input, as PEFT's
    ``PeftModelForCausalLM`` does. The logits keep the input's length.

    Only a full forward is supported (training, scoring): a call that brings its own
    ``past_key_values`` (``generate()``, incremental decoding) is refused.

    Args:
        shape: the model's layers, KV heads and head size.
        name: the first adapter's name; it becomes the active one.
        settings: its number of virtual tokens and initialisation.
        dtype, device: of the prefix (the model's).
    """

    method = "prefix tuning"

    def __init__(
        self,
        shape: PrefixShape,
        name: str,
        settings: PrefixSettings,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(name)
        self.shape = shape
        self.embedding = nn.ParameterDict()
        self.settings: dict[str, PrefixSettings] = {}
        self._options = {"dtype": dtype, "device": device}
        self.add_adapter(name, settings)

    def add_adapter(self, name: str, settings: PrefixSettings) -> None:
        """Adds a fresh prefix: N(0, 1) like PEFT's ``nn.Embedding``, or zeros.

        Raises:
            ValueError: the name is taken, or ``num_virtual_tokens`` is not positive.
        """
        if name in self.settings:
            raise ValueError(f"the model already has a prefix named {name!r}")
        tokens = settings.num_virtual_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {tokens!r}")
        weight = torch.zeros(tokens, self.shape.width, **self._options)
        if settings.init == "normal":
            nn.init.normal_(weight)
        self.embedding[name] = nn.Parameter(weight)
        self.settings[name] = settings

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.embedding[name]] if name in self.settings else []

    def _apply(self, fn: Any, recurse: bool = True) -> KVPrefix:
        # New prefixes follow the model's later moves and casts (model.to(...)).
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, **self._options))
        self._options = {"dtype": probe.dtype, "device": probe.device}
        return self

    def cache(self, batch: int) -> DynamicCache:
        """The active prefix as the past keys and values of a batch of ``batch`` sequences."""
        weight = self.embedding[self.active_adapter]
        s = self.shape
        # [T, L*2*H*D] -> [L*2, B, H, T, D]: PEFT's get_prompt layout; 2l is layer l's keys.
        kv = weight.view(weight.shape[0], s.num_layers * 2, s.num_kv_heads, s.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(s.num_layers)])

    def inject(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The forward pre-hook: the model's arguments with the active prefix put in."""
        if not self.uses_adapter():
            return None
        names = list(inspect.signature(model.forward).parameters)
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        if call.get("past_key_values") is not None:
            raise ValueError(
                "prefix tuning: the call brings its own past_key_values; lorakit's prefix "
                "supports a full forward pass (training, scoring), not generate() or "
                "incremental decoding"
            )
        if model.training and any(
            getattr(m, "gradient_checkpointing", False) for m in model.modules()
        ):
            raise ValueError(
                "prefix tuning does not work with gradient checkpointing, which drops the cache "
                "that carries the prefix; disable it"
            )
        inputs = call.get("input_ids")
        if inputs is None:
            inputs = call.get("inputs_embeds")
        batch = inputs.shape[0]
        tokens = self.settings[self.active_adapter].num_virtual_tokens
        call["past_key_values"] = self.cache(batch)
        mask = call.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prefix tuning needs a 2-D attention_mask, got {mask.dim()}-D")
            call["attention_mask"] = torch.cat([mask.new_ones(batch, tokens), mask], dim=1)
        for key in ("position_ids", "cache_position"):
            if call.get(key) is not None:
                call[key] = call[key] + tokens
        return (), call

    def forward(self) -> None:
        raise TypeError("KVPrefix is not called; it feeds the model's forward through its hook")

    def extra_repr(self) -> str:
        s = self.shape
        adapters = ", ".join(
            f"{n}: {v.num_virtual_tokens} tokens" for n, v in self.settings.items()
        )
        return (
            f"active={self.active_adapter!r}, layers={s.num_layers}, "
            f"kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, {adapters}"
        )
