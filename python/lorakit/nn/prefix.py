"""Prefix tuning: learned keys and values that every attention layer sees before the input."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.nn.adapter_layer import AdapterLayer

# The attribute that marks a cache holding a prefix (its value: the adapter's name), so a later
# call with that cache, such as generate()'s next step, does not add the prefix again.
_HOLDS_PREFIX = "lorakit_prefix"
# The attribute that marks a cache made only to carry the prefix through a call that asked for no
# cache (use_cache=False): the output must not return it, as the model alone would return none.
_UNREQUESTED = "lorakit_prefix_unrequested"
# The name of the cache argument of transformers' models before 5.24, which renamed it to
# ``cache`` and still accepts the old name as a deprecated alias.
_LEGACY_CACHE = "past_key_values"
# The switch of transformers' GradientCheckpointingLayer that keeps its cache under checkpointing.
_KEEPS_CACHE = "_can_checkpoint_with_cache"


class _ReplayedPrefix(DynamicCache):
    """The prefix for a gradient-checkpointed training call. Each layer's update returns the
    prefix followed by the layer's new keys and values without storing them, so the layer's
    second run in the backward pass sees what its first run saw."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.layers[layer_idx]
        keys = torch.cat([prefix.keys, key_states], dim=-2)
        return keys, torch.cat([prefix.values, value_states], dim=-2)


def _checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules (layers, and backbones that hold the switch) whose gradient checkpointing
    this call of ``model`` uses (training, with gradients, checkpointing enabled); none
    otherwise."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    return [
        m
        for m in model.modules()
        if m.training and getattr(m, "gradient_checkpointing", False) is True
    ]


def _check_positions(
    positions: torch.Tensor, mask: torch.Tensor | None, tokens: int, past: int, argument: str
) -> None:
    """Refuses positions that do not continue a cache holding ``past`` tokens after the
    ``tokens`` prefix positions, in the rows that no padding shifts (every row without a mask;
    with one, ``mask`` covering the prefix too, the rows of ones over the cache). This is what
    generate() continuing from a prefix cache does: it counts the prefix as input, so it feeds
    the wrong tokens at the wrong positions."""
    if past <= 0:
        return
    first = positions[..., 0]  # [batch], or [3, batch] for multimodal rotary positions
    unshifted = torch.ones_like(first, dtype=torch.bool)
    if mask is not None:
        unshifted = unshifted & mask[:, : tokens + past].bool().all(dim=1)
    wrong = unshifted & (first != past)
    if bool(wrong.any()):
        raise ValueError(
            f"prefix tuning: position_ids start at {first[wrong][0].item()} in a row without "
            f"padding, but {argument} holds {past} tokens after the prefix, so they should start "
            f"at {past} (generate() cannot continue from a prefix cache: give it the whole "
            "sequence without a cache)"
        )


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
    :meth:`inject` runs before the model's forward (a forward pre-hook): it puts the prefix into
    the model's cache argument (``cache``, or ``past_key_values`` before transformers 5.24, as the
    forward's signature names it; a ``transformers.DynamicCache`` whose layer ``l`` starts with
    the prefix's keys and values), prepends ``T`` ones to ``attention_mask`` and shifts
    ``position_ids`` by ``T``, so every attention layer attends to ``T`` learned positions before
    the input, as PEFT's ``PeftModelForCausalLM`` does. The logits keep the input's length.

    The cache the model returns keeps the prefix, so ``generate()`` and incremental decoding work:
    a call without a cache, or with an empty one, starts it with the prefix; a later call with that
    cache adds nothing to it. A call without a cache and with ``use_cache=False`` gets no cache
    back (:meth:`drop_unrequested_cache`), as without a prefix, so ``generate(use_cache=False)``
    feeds the whole sequence each step. ``position_ids`` always count the caller's tokens only and
    are shifted by ``T``; ``attention_mask`` may cover the caller's tokens (``T`` ones are
    prepended, as ``generate()`` needs) or the whole cache plus the input (left as it is). A
    non-empty cache that this prefix did not start is refused. A gradient-checkpointed training
    call runs with a :class:`_ReplayedPrefix`, which its layers may keep (transformers drops the
    cache of checkpointed layers otherwise) because reading it twice gives the same keys.

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
        # The running call's checkpointed layers and backbones changed by _keep_cache_in.
        self._replay: tuple[list[nn.Module], list[nn.Module]] = ([], [])
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
        return self._start(DynamicCache(), batch)

    def _start(self, cache: DynamicCache, batch: int) -> DynamicCache:
        """Puts the active prefix into the empty ``cache`` in place (generate() keeps using the
        object it passed) and marks the cache as holding it."""
        weight = self.embedding[self.active_adapter]
        s = self.shape
        # [T, L*2*H*D] -> [L*2, B, H, T, D]: PEFT's get_prompt layout; 2l is layer l's keys.
        kv = weight.view(weight.shape[0], s.num_layers * 2, s.num_kv_heads, s.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        for layer in range(s.num_layers):
            # DynamicCache's own update: a _ReplayedPrefix stores only through it.
            DynamicCache.update(cache, kv[2 * layer], kv[2 * layer + 1], layer)
        setattr(cache, _HOLDS_PREFIX, self.active_adapter)
        return cache

    def _cache_for(self, cache: Any, batch: int, use_cache: bool, argument: str) -> DynamicCache:
        """The cache a call runs with: ``cache`` if it holds the active prefix, else a new or
        the given empty one started with it. ``argument`` names the cache in messages."""
        holds = getattr(cache, _HOLDS_PREFIX, None)
        if holds is not None:
            if holds != self.active_adapter:
                raise ValueError(
                    f"prefix tuning: {argument} holds prefix {holds!r} but the active one is "
                    f"{self.active_adapter!r}; start a new cache after switching adapters"
                )
            return cache
        if cache is None:
            cache = self.cache(batch)
            if not use_cache:
                setattr(cache, _UNREQUESTED, True)
            return cache
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                "prefix tuning keeps the prefix in a transformers DynamicCache (generate()'s "
                f"default); got {argument} of type {type(cache).__name__}"
            )
        if cache.get_seq_length() > 0:
            # Its contents were computed without this prefix; prepending it now would not
            # change them, so the result would be neither the base model's nor the adapter's.
            raise ValueError(
                f"prefix tuning: {argument} holds {cache.get_seq_length()} positions that "
                "lorakit's prefix did not start; pass no cache, an empty one, or one returned "
                "by this model with this prefix active"
            )
        return self._start(cache, batch)

    def inject(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The forward pre-hook: the model's arguments with the active prefix put in."""
        names = list(inspect.signature(model.forward).parameters)
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        # The forward's own name for the cache; the legacy name is its alias where it differs
        # (transformers then takes the new one when both are given, as done here).
        argument = "cache" if "cache" in names else _LEGACY_CACHE
        given = call.get(argument)
        if given is None:
            given = call.get(_LEGACY_CACHE)
        if not self.uses_adapter():
            holds = getattr(given, _HOLDS_PREFIX, None)
            if holds is not None:
                raise ValueError(
                    f"prefix tuning: {argument} holds prefix {holds!r} but the prefix is off "
                    "(adapters disabled or merged, or another adapter active); start a new cache"
                )
            return None
        inputs = call.get("input_ids")
        if inputs is None:
            inputs = call.get("inputs_embeds")
        batch, length = inputs.shape[:2]
        tokens = self.settings[self.active_adapter].num_virtual_tokens
        checkpointed = _checkpointed_modules(model)
        if checkpointed:
            cache = self._replayed_prefix(checkpointed, given, batch, argument)
        else:
            use_cache = call.get("use_cache")
            if use_cache is None:
                use_cache = getattr(model.config, "use_cache", True)
            cache = self._cache_for(given, batch, use_cache, argument)
        call.pop(_LEGACY_CACHE, None)
        call[argument] = cache
        mask = call.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prefix tuning needs a 2-D attention_mask, got {mask.dim()}-D")
            # The keys this call attends to: the cache (prefix included) and the input.
            keys = cache.get_seq_length() + length
            if mask.shape[1] == keys - tokens:  # the caller's tokens only, as generate() gives
                call["attention_mask"] = torch.cat([mask.new_ones(batch, tokens), mask], dim=1)
            elif mask.shape[1] != keys:
                raise ValueError(
                    f"prefix tuning: attention_mask has {mask.shape[1]} columns; expected "
                    f"{keys - tokens} (past and new tokens) or {keys} (with the {tokens} prefix "
                    "positions)"
                )
        positions = call.get("position_ids")
        if positions is not None:
            past = cache.get_seq_length() - tokens
            _check_positions(positions, call.get("attention_mask"), tokens, past, argument)
            call["position_ids"] = positions + tokens
        if checkpointed:  # last, so that no check above can leave the modules changed
            self._keep_cache_in(checkpointed)
        return (), call

    def _replayed_prefix(
        self, checkpointed: list[nn.Module], given: Any, batch: int, argument: str
    ) -> _ReplayedPrefix:
        """The cache a gradient-checkpointed training call runs with (see
        :meth:`_keep_cache_in`); ``given`` is the caller's cache, ``argument`` its name."""
        if given is not None:
            raise ValueError(
                f"prefix tuning: a gradient-checkpointed training call takes no {argument} "
                "(transformers drops it); pass none"
            )
        if not any(hasattr(m, _KEEPS_CACHE) for m in checkpointed):
            raise ValueError(
                "prefix tuning: this transformers release drops the cache, which carries the "
                "prefix, in every gradient-checkpointed layer; disable gradient checkpointing "
                "or upgrade transformers"
            )
        cache = self._start(_ReplayedPrefix(), batch)
        setattr(cache, _UNREQUESTED, True)
        return cache

    def _keep_cache_in(self, checkpointed: list[nn.Module]) -> None:
        """Lets this call's replayed prefix reach the checkpointed layers, which run twice
        (forward, then again in the backward pass): transformers drops a checkpointed layer's
        cache unless the layer says it only reads it, and some backbones (GPT-2's) drop it for
        all their layers while their own ``gradient_checkpointing`` is set; their layers still
        checkpoint themselves. :meth:`drop_unrequested_cache` puts both back after the call."""
        layers = [m for m in checkpointed if hasattr(m, _KEEPS_CACHE)]
        backbones = [m for m in checkpointed if not hasattr(m, _KEEPS_CACHE)]
        for layer in layers:
            setattr(layer, _KEEPS_CACHE, True)
        for backbone in backbones:
            backbone.gradient_checkpointing = False
        self._replay = (layers, backbones)

    def drop_unrequested_cache(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """The forward hook: the output without a cache that :meth:`inject` made for a call
        that asked for none (the model returns the cache it ran with whatever ``use_cache``
        says), so that, as without a prefix, ``generate(use_cache=False)`` gets no cache back.
        Works on a ``ModelOutput`` and on the tuple of ``return_dict=False``."""
        self._end_replay()
        if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
            kept = {k: v for k, v in output.items() if not getattr(v, _UNREQUESTED, False)}
            return type(output)(**kept) if len(kept) < len(output) else output
        if isinstance(output, tuple):
            return tuple(v for v in output if not getattr(v, _UNREQUESTED, False))
        return output

    def _end_replay(self) -> None:
        """Undoes :meth:`_keep_cache_in` (the forward hook runs when the call raised too)."""
        layers, backbones = self._replay
        for layer in layers:
            vars(layer).pop(_KEEPS_CACHE, None)
        for backbone in backbones:
            backbone.gradient_checkpointing = True
        self._replay = ([], [])

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
