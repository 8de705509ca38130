"""NF4 weights: a 4-bit tensor container, byte-compatible with bitsandbytes' ``Linear4bit``."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from lorakit import ops
from lorakit.quant.dynamic_map import dynamic_map

# bitsandbytes' fixed blocksize for the second-level (double) quantization of NF4 scales.
NESTED_BLOCKSIZE = 256
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


@functools.cache
def _nf4_code_cpu() -> torch.Tensor:
    # Read from the native table (bytes 0x00, 0x11, ..., 0xFF at scale 1 expand to each code
    # twice), so that Python holds no second copy of it.
    both_nibbles = torch.arange(0, 256, 17, dtype=torch.uint8)
    return ops.nf4_dequantize(both_nibbles, torch.ones(1), 32, [32], torch.float32)[::2]


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 code values, float32, as the native kernels use them (a fresh copy)."""
    return _nf4_code_cpu().to(device, copy=True)


@dataclass(frozen=True)
class QuantizedAbsmax:
    """NF4 block scales stored in 8 bits (QLoRA's double quantization).

    ``scales = code[q] * absmax[block of 256] + offset``, where offset is the mean of the scales
    subtracted before quantizing so that the signed 8-bit map is used symmetrically.
    """

    q: torch.Tensor  # uint8, one per NF4 block
    absmax: torch.Tensor  # float32, one per 256 NF4 blocks
    code: torch.Tensor  # float32 (256,), the dynamic map
    offset: float

    @classmethod
    def from_scales(cls, scales: torch.Tensor) -> QuantizedAbsmax:
        offset = scales.mean()
        code = dynamic_map(signed=True, device=scales.device)
        q, absmax = ops.blockwise8_quantize(scales - offset, code, NESTED_BLOCKSIZE)
        return cls(q=q, absmax=absmax, code=code, offset=offset.item())

    def dequantize(self) -> torch.Tensor:
        scales = ops.blockwise8_dequantize(self.q, self.absmax, self.code, NESTED_BLOCKSIZE)
        return scales + self.offset

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.absmax.nbytes + self.code.nbytes

    def to(self, device: torch.device | str) -> QuantizedAbsmax:
        return replace(
            self, q=self.q.to(device), absmax=self.absmax.to(device), code=self.code.to(device)
        )


@dataclass(frozen=True)
class NF4Weight:
    """A weight quantized to 4-bit NormalFloat in blocks.

    Attributes:
        packed: uint8 ``(ceil(numel / 2),)``, two 4-bit codes per byte, first in the high nibble.
        absmax: float32 per-block scales, or :class:`QuantizedAbsmax` when double-quantized.
        shape: shape of the original weight.
        dtype: dtype of the original weight (and of :meth:`dequantize`).
        blocksize: values per scale (32 ... 4096).
    """

    packed: torch.Tensor
    absmax: torch.Tensor | QuantizedAbsmax
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @classmethod
    def from_float(
        cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Weight:
        """Quantizes ``w`` (float32 / float16 / bfloat16, any shape)."""
        packed, absmax = ops.nf4_quantize(w, blocksize)
        scales = _stored_scales(absmax, double_quant)
        return cls(packed=packed, absmax=scales, shape=w.shape, dtype=w.dtype, blocksize=blocksize)

    def with_low_rank_update(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
    ) -> NF4Weight:
        """This 2-D weight plus ``scale · lora_b @ lora_a``, quantized again block by block in one
        native op (:func:`lorakit.ops.nf4_lora_merge`); scales are double-quantized again if they
        were."""
        packed, absmax = ops.nf4_lora_merge(
            self.packed, self.scales(), self.blocksize, self.shape, lora_a, lora_b, scale
        )
        return replace(self, packed=packed, absmax=_stored_scales(absmax, self.double_quant))

    def with_scaling(self, scale: torch.Tensor) -> NF4Weight:
        """This 2-D weight times ``scale`` (an ``(out, 1)`` column scales rows, a ``(1, in)`` row
        columns, as IA3 does), expanded to float32 and quantized again as :meth:`from_float` does;
        scales are double-quantized again if they were.

        A row scaling maps each block (a run of one row) onto the same codes times a new scale,
        so only double-quantized scales move; a column scaling rounds each value again.
        """
        w = self.dequantize(torch.float32) * scale.to(torch.float32)
        return replace(NF4Weight.from_float(w, self.blocksize, self.double_quant), dtype=self.dtype)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, QuantizedAbsmax)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def scales(self) -> torch.Tensor:
        """The float32 per-block scales (dequantized first when double-quantized)."""
        return self.absmax.dequantize() if isinstance(self.absmax, QuantizedAbsmax) else self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the weight in ``dtype`` (default: the original dtype)."""
        return ops.nf4_dequantize(
            self.packed, self.scales(), self.blocksize, self.shape, dtype or self.dtype
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales (and their 8-bit state) and the NF4 code table."""
        return self.packed.nbytes + self.absmax.nbytes + 16 * 4

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / max(1, math.prod(self.shape))

    def to(self, device: torch.device | str) -> NF4Weight:
        return replace(self, packed=self.packed.to(device), absmax=self.absmax.to(device))

    # ---- bitsandbytes state-dict layout -------------------------------------------------------

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes ``Linear4bit`` keys (``weight``, ``weight.absmax``, ...).

        ``prefix`` is the weight's key; a module saves with ``f"{module_prefix}weight"``.
        """
        device = self.device
        meta: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix: self.packed.view(-1, 1)}
        if isinstance(self.absmax, QuantizedAbsmax):
            out[f"{prefix}.absmax"] = self.absmax.q
            out[f"{prefix}.quant_map"] = nf4_code(device)
            out[f"{prefix}.nested_absmax"] = self.absmax.absmax
            out[f"{prefix}.nested_quant_map"] = self.absmax.code.clone()
            meta |= {
                "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": "float32",
                "nested_offset": self.absmax.offset,
            }
        else:
            out[f"{prefix}.absmax"] = self.absmax
            out[f"{prefix}.quant_map"] = nf4_code(device)
        encoded = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(encoded), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"
    ) -> NF4Weight:
        """Reads the keys written by :meth:`state_dict` or by bitsandbytes ``Linear4bit``.

        Raises:
            KeyError: a required key is missing (the message lists what is there).
            ValueError: the entries are not NF4, or do not fit together.
        """
        meta = _read_quant_state(state_dict, prefix)
        packed = _require(state_dict, prefix).reshape(-1)
        if packed.dtype != torch.uint8:
            raise ValueError(f"{prefix}: packed data must be uint8, got {packed.dtype}")
        code = _require(state_dict, f"{prefix}.quant_map")
        if not torch.equal(code.float().cpu(), nf4_code()):
            raise ValueError(f"{prefix}.quant_map is not the NF4 code table")
        absmax: torch.Tensor | QuantizedAbsmax = _require(state_dict, f"{prefix}.absmax")
        if "nested_offset" in meta:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
                raise ValueError(
                    f"{prefix}: nested blocksize {meta.get('nested_blocksize')} is not supported "
                    f"(bitsandbytes always uses {NESTED_BLOCKSIZE})"
                )
            absmax = QuantizedAbsmax(
                q=absmax,
                absmax=_require(state_dict, f"{prefix}.nested_absmax"),
                code=_require(state_dict, f"{prefix}.nested_quant_map"),
                offset=float(meta["nested_offset"]),
            )
        weight = cls(
            packed=packed,
            absmax=absmax,
            shape=torch.Size(meta["shape"]),
            dtype=_dtype_from_name(str(meta["dtype"])),
            blocksize=int(meta["blocksize"]),
        )
        weight._check_consistent(prefix)
        return weight

    def _check_consistent(self, name: str) -> None:
        numel = math.prod(self.shape)
        blocks = -(-numel // self.blocksize)
        if self.packed.numel() != -(-numel // 2):
            raise ValueError(
                f"{name}: {self.packed.numel()} packed bytes do not fit shape {list(self.shape)}"
            )
        n_scales = (
            self.absmax.q.numel()
            if isinstance(self.absmax, QuantizedAbsmax)
            else self.absmax.numel()
        )
        if n_scales != blocks:
            raise ValueError(
                f"{name}: {n_scales} scales do not fit shape {list(self.shape)} "
                f"with blocksize {self.blocksize}"
            )


def _stored_scales(absmax: torch.Tensor, double_quant: bool) -> torch.Tensor | QuantizedAbsmax:
    return QuantizedAbsmax.from_scales(absmax) if double_quant and absmax.numel() else absmax


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported NF4 weight dtype {name!r}")
    return dtype


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        present = sorted(k for k in state_dict if k.split(".")[0] == key.split(".")[0])
        raise KeyError(f"missing {key!r} in the state dict (found: {present})")
    return state_dict[key]


def _read_quant_state(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, object]:
    key = f"{prefix}.{_QUANT_STATE_KEY}"
    if key not in state_dict:
        other = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.")]
        if other:
            raise ValueError(f"{other[0]!r}: only NF4 weights are supported")
        _require(state_dict, key)
    try:
        meta = json.loads(bytes(state_dict[key].tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key} does not hold a readable quant state: {e}") from e
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
    if missing or meta["quant_type"] != "nf4":
        raise ValueError(f"{key} is not an NF4 quant state: {meta}")
    return meta
