"""Typed wrappers over ``torch.ops.lorakit``: the only package that calls the native ops.

Each op also gets a fake (meta) kernel beside its wrapper so that ``torch.compile`` and
``FakeTensor`` can trace it without running it. Argument checks happen in C++ (``TORCH_CHECK``)
and surface as ``RuntimeError`` naming the bad argument. One module per family of ops
(:mod:`~lorakit.ops.nf4`, :mod:`~lorakit.ops.blockwise8`, :mod:`~lorakit.ops.adamw`,
:mod:`~lorakit.ops.merge`, :mod:`~lorakit.ops.lora_linear`, :mod:`~lorakit.ops.fused_ce`); this
package re-exports their wrappers.
"""

from lorakit.op_checks import NF4_BLOCKSIZES as NF4_BLOCKSIZES  # re-exported for configs
from lorakit.ops import autocast  # noqa: F401  (the LoRA ops' rules under torch.autocast)
from lorakit.ops.adamw import ADAMW8BIT_BLOCKSIZE as ADAMW8BIT_BLOCKSIZE
from lorakit.ops.adamw import adamw8bit_step_ as adamw8bit_step_
from lorakit.ops.adamw import adamw_step_ as adamw_step_
from lorakit.ops.blockwise8 import blockwise8_dequantize as blockwise8_dequantize
from lorakit.ops.blockwise8 import blockwise8_quantize as blockwise8_quantize
from lorakit.ops.fused_ce import fused_linear_cross_entropy as fused_linear_cross_entropy
from lorakit.ops.fused_ce import fused_linear_logprobs as fused_linear_logprobs
from lorakit.ops.lora_linear import lora_linear as lora_linear
from lorakit.ops.lora_linear import lora_linear_nf4 as lora_linear_nf4
from lorakit.ops.merge import lora_merge_ as lora_merge_
from lorakit.ops.merge import nf4_lora_merge as nf4_lora_merge
from lorakit.ops.nf4 import nf4_dequantize as nf4_dequantize
from lorakit.ops.nf4 import nf4_quantize as nf4_quantize
