// NF4 matrix-vector products for a few input rows (decode), read straight from the 4-bit codes:
// nothing dequantized is written to memory. Compiled for AVX2 + FMA in its own translation unit
// without torch headers (see nf4_dequantize_avx2.h); call only when cpu_has_avx2_fma() says so.
#pragma once

#include <cstdint>

#include "lora/nf4_scales.h"

namespace lorakit::lora {

bool cpu_has_avx2_fma();

// For output rows o in [row_begin, row_end) and input rows i < m:
//   y[i * ldy + o] = sum over blocks b of row o: scale[b] * sum_{k in b} x[i * in + k] * code[q(o *
//   in + k)]
// (scale[b] from BlockScales). Needs in % 32 == 0 (a block of 32 or more then never splits a group
// of 32 weights) and a power-of-two blocksize. x must be in the order of order_for_gemv.
void nf4_gemv_avx2(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy);

// Writes src (n values, n % 8 == 0) in the order in which nf4_gemv_avx2 decodes weights: each
// run of 8 as 0, 2, 4, 6, 1, 3, 5, 7.
void order_for_gemv(const float* src, int64_t n, float* dst);

}  // namespace lorakit::lora
