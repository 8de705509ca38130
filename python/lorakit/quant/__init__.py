"""Quantized weight containers and the quantization maps they use."""

from lorakit.quant.dynamic_map import dynamic_map
from lorakit.quant.nf4 import NF4Weight, QuantizedAbsmax, nf4_code

__all__ = ["NF4Weight", "QuantizedAbsmax", "dynamic_map", "nf4_code"]
