// Where the decode kernels find an NF4 block's float32 scale: a float32 absmax per block, or
// QLoRA's double quantization (8-bit codes of the scales), decoded on the fly so that no float32
// copy of the scales is written per call. Torch-free: included by the AVX2 and CUDA kernels.
#pragma once

#include <cstdint>

#include "nf4/nf4_code.h"  // LORAKIT_HOST_DEVICE

namespace lorakit::lora {

// bitsandbytes double-quantizes NF4 scales in blocks of 256 (its fixed nested blocksize).
constexpr int kNestedShift = 8;

// absmax != nullptr: scale[b] = absmax[b]. Otherwise (double-quantized):
//   scale[b] = code[q[b]] * nested_absmax[b / 256] + offset,
// the product rounded to float32 before the add, as blockwise8_dequantize followed by a separate
// `+ offset` computes it, so both ways give the same bits.
struct BlockScales {
  const float* absmax;
  const uint8_t* q;
  const float* nested_absmax;
  const float* code;
  float offset;
};

// The host compiler must not contract this into an FMA (-ffp-contract=off on files that call it);
// on the device the _rn intrinsics forbid it.
LORAKIT_HOST_DEVICE float block_scale(const BlockScales& s, int64_t b) {
  if (s.absmax) return s.absmax[b];
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(s.code[s.q[b]], s.nested_absmax[b >> kNestedShift]), s.offset);
#else
  return s.code[s.q[b]] * s.nested_absmax[b >> kNestedShift] + s.offset;
#endif
}

}  // namespace lorakit::lora
