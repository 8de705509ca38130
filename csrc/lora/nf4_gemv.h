// NF4 matrix-vector products for a few input rows (decode), read straight from the 4-bit codes:
// nothing dequantized is written to memory. One copy per instruction-set level, each in its own
// translation unit compiled for that level and free of torch headers (see CMakeLists.txt); the
// caller picks one with cpu_isa().
#pragma once

#include <cstdint>

#include "lora/nf4_scales.h"

namespace lorakit::lora {

// Every kernel computes, for output rows o in [row_begin, row_end) and input rows i < m,
//   y[i * ldy + o] = sum over blocks b of row o: scale[b] * sum_{k in b} x[i * in + k] * code[q(o *
//   in + k)]
// (scale[b] from BlockScales), accumulating in float32. They need in % 32 == 0 (a block of 32 or
// more then never splits a group of 32 weights) and a power-of-two blocksize.

// AVX2 + FMA. x must be in the order of order_for_gemv.
void nf4_gemv_avx2(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy);

// Writes src (n values, n % 8 == 0) in the order in which nf4_gemv_avx2 decodes weights: each
// run of 8 as 0, 2, 4, 6, 1, 3, 5, 7.
void order_for_gemv(const float* src, int64_t n, float* dst);

// AVX2 + FMA for bfloat16 x (widened to float32): the codes rounded to bfloat16, as AVX-512 BF16
// does, which takes a third of the byte shuffles of exact codes. x in the order of
// order_for_gemv_bf16 (n % 32 == 0).
void nf4_gemv_avx2_bf16(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                        int64_t in, const float* x, int64_t m, int64_t row_begin, int64_t row_end,
                        float* y, int64_t ldy);

// Writes src (n values, n % 32 == 0) in the order in which nf4_gemv_avx2_bf16 decodes weights:
// position 8v + l of each run of 32 takes element 16 (v / 2) + 4 (l % 4) + 2 (v % 2) + l / 4.
void order_for_gemv_bf16(const float* src, int64_t n, float* dst);

// AVX-512, x in its own order.
void nf4_gemv_avx512(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                     int64_t in, const float* x, int64_t m, int64_t row_begin, int64_t row_end,
                     float* y, int64_t ldy);

// AVX-512 BF16 for bfloat16 x (its bits): products of x with the codes rounded to bfloat16, summed
// in float32 per block by bf16 dot-product instructions, then scaled.
void nf4_gemv_avx512_bf16(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                          int64_t in, const uint16_t* x, int64_t m, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy);

}  // namespace lorakit::lora
