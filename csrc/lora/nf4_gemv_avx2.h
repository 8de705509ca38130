// NF4 matrix-vector products for a few input rows (decode), read straight from the 4-bit codes:
// nothing dequantized is written to memory. Compiled for AVX2 + FMA in its own translation unit
// without torch headers (see nf4_dequantize_avx2.h); call only when cpu_has_avx2_fma() says so.
#pragma once

#include <cstdint>

namespace lorakit::lora {

bool cpu_has_avx2_fma();

// For output rows o in [row_begin, row_end) and input rows i < m:
//   y[i * ldy + o] = sum_k x[i * in + k] * W[o, k],  W[o, k] = code[q(o * in + k)] * absmax[block].
// Needs in % 16 == 0 (blocks of 32 or more then never split a group of 16 values) and a
// power-of-two blocksize. x must hold each group of 16 values deinterleaved, the 8 even positions
// first (see deinterleave16), to match the order in which nibbles come out of the packed bytes.
void nf4_gemv_avx2(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy);

// Writes src (n values, n % 16 == 0) with each group of 16 reordered as 0, 2, ..., 14, 1, ..., 15.
void deinterleave16(const float* src, int64_t n, float* dst);

}  // namespace lorakit::lora
