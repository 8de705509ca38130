"""A frozen linear layer whose weight is held in 4-bit NF4."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lorakit import ops
from lorakit.quant import NF4Weight, QuantizedAbsmax
from lorakit.quant.nf4_storage import block_rows, from_block_rows, nested_part

# The frozen parameters that hold the weight (see lorakit.quant.nf4_storage); the state dict
# holds bitsandbytes' keys instead.
_STORAGE = ("weight_codes", "weight_scales")


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + bias + scale · (x_lora Aᵀ) Bᵀ`` with W in NF4 (:func:`ops.lora_linear_nf4`).

    Double-quantized scales go to the op in their 8-bit form, decoded inside the kernels: expanding
    them here took an extra pass and op call per forward, about a tenth of a 1-row decode step.
    """
    absmax = weight.absmax
    if isinstance(absmax, QuantizedAbsmax):
        return ops.lora_linear_nf4(
            x,
            weight.packed,
            absmax.q,
            weight.blocksize,
            bias,
            lora_a,
            lora_b,
            scale,
            x_lora,
            absmax.absmax,
            absmax.code,
            absmax.offset,
        )
    return ops.lora_linear_nf4(
        x, weight.packed, absmax, weight.blocksize, bias, lora_a, lora_b, scale, x_lora
    )


class NF4Linear(nn.Module):
    """``y = x Wᵀ + bias`` with a frozen weight stored in NF4 (about 4.13 bits per weight).

    The weight is expanded to x's dtype a tile of rows at a time inside the native op, never in
    full. Its state dict uses bitsandbytes' ``Linear4bit`` keys (``weight``, ``weight.absmax``,
    ``weight.quant_state.bitsandbytes__nf4``, ...), so either library loads the other's.

    The weight is held as two frozen ``uint8`` parameters, ``weight_codes`` and ``weight_scales``,
    one row per quantization block (:mod:`lorakit.quant.nf4_storage`), so that FSDP2's
    ``fully_shard`` shards it like any parameter: each rank keeps its rows and the layer's
    are all-gathered while it runs. ``weight`` is the :class:`~lorakit.quant.NF4Weight` viewing
    them; it is readable while they are whole (always outside FSDP; in forward, backward or after
    ``unshard()`` under it).

    Args:
        weight: an ``(out, in)`` :class:`~lorakit.quant.NF4Weight`.
        bias: ``(out,)`` or None; kept frozen, in the weight's dtype.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # the setter below registers the storage
        frozen = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", frozen)  # None included, as nn.Linear keeps it

    @property
    def weight(self) -> NF4Weight:
        params = self._parameters  # read directly: nn.Module.__getattr__ is slow on a hot path
        codes, scales = params["weight_codes"], params["weight_scales"]
        if isinstance(codes, DTensor):
            raise RuntimeError(
                "this NF4Linear's weight is sharded by FSDP; it is whole only while the layer "
                "runs or after unshard()"
            )
        # Building the views takes about 30 us, a twentieth of a 1-row forward of a 576 x 1536
        # layer: they are kept while the parameters and their memory are the same (FSDP2 hands
        # in other tensors, or the same ones with their memory freed and allocated again). A
        # compiled graph builds them once, and cannot compare data pointers.
        if torch.compiler.is_compiling():
            return from_block_rows(codes, scales, self._nested, *self._meta)
        key = (codes.data_ptr(), scales.data_ptr())
        cached = self._view
        if cached is not None and cached[0] is codes and cached[1] is scales and cached[2] == key:
            return cached[3]
        weight = from_block_rows(codes, scales, self._nested, *self._meta)
        self._view = (codes, scales, key, weight)
        return weight

    @weight.setter
    def weight(self, value: NF4Weight) -> None:
        if isinstance(self._parameters.get("weight_codes"), DTensor):
            raise RuntimeError("cannot replace the weight of an NF4Linear sharded by FSDP")
        codes, scales = block_rows(value)
        self.weight_codes = nn.Parameter(codes, requires_grad=False)
        self.weight_scales = nn.Parameter(scales, requires_grad=False)
        self._nested = nested_part(value)
        self._meta = (value.shape, value.dtype, value.blocksize)
        self._view: tuple[torch.Tensor, torch.Tensor, tuple[int, int], NF4Weight] | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Quantizes ``linear``'s weight (on its device); the bias stays in full precision."""
        weight = NF4Weight.from_float(linear.weight.detach(), blocksize, double_quant)
        return cls(weight, linear.bias)

    @property
    def blocksize(self) -> int:
        """Values per scale; readable under FSDP too (the weight is not)."""
        return self._meta[2]

    @property
    def double_quant(self) -> bool:
        """Whether the scales are 8-bit (double quantization); readable under FSDP too."""
        return self._nested is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        no_adapter = x.new_empty((0, self.in_features)), x.new_empty((self.out_features, 0))
        return nf4_lora_linear(x, self.weight, self.bias, *no_adapter, 0.0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}"
        )

    # The uint8 storage is a parameter (moved by nn.Module, never cast); the second level of
    # double-quantized scales is not, and follows the device; the expansion dtype follows float
    # casts (model.to(torch.bfloat16)).
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Linear:
        shape, dtype, blocksize = self._meta
        probe = fn(torch.empty(0, dtype=dtype, device=self.weight_codes.device))
        super()._apply(fn, recurse)
        self._meta = (shape, probe.dtype, blocksize)
        self._view = None
        if self._nested is not None:
            self._nested = self._nested.to(probe.device)
        return self

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _STORAGE:
            del destination[f"{prefix}{name}"]
        destination.update(self.weight.state_dict(f"{prefix}weight"))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = f"{prefix}weight"
        own = {k: v for k, v in state_dict.items() if k == key or k.startswith(f"{key}.")}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        unexpected_keys[:] = [k for k in unexpected_keys if k not in own]
        storage = {f"{prefix}{name}" for name in _STORAGE}
        missing_keys[:] = [k for k in missing_keys if k not in storage]
        if key not in own:
            missing_keys.append(key)
            return
        try:
            weight = NF4Weight.from_state_dict(own, key)
        except (KeyError, ValueError) as e:
            error_msgs.append(str(e))
            return
        if weight.shape != self.weight.shape:
            error_msgs.append(
                f"{key}: shape {list(weight.shape)} does not match {list(self.weight.shape)}"
            )
            return
        self.weight = weight.to(self.weight_codes.device)
