// The row loop of the float32 decode kernels, written once over a vector type V that each kernel's
// translation unit (nf4_gemv_avx2.cpp, nf4_gemv_avx512.cpp) defines for its instruction set, in
// an anonymous namespace, so each instantiation is its unit's own:
//   V::Reg, a register of floats, and V::Codes, the NF4 table as the decoder wants it;
//   V::kVectors registers hold 32 weights;
//   V::zero(), V::set1(f), V::add(a, b), V::mul(a, b), V::fmadd(a, b, c) = a * b + c,
//   V::load(p) (unaligned), V::sum(r) (across lanes);
//   V::decode32(bytes, codes, w): the unscaled codes of the 32 weights in 16 packed bytes, in
//   w[0 .. kVectors), in the order the kernel expects x in.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora/gemv_row_passes.h"
#include "lora/nf4_scales.h"

namespace lorakit::lora {

// M input rows at once, so each group of 32 weights is decoded once for all of them. Below 8
// rows, two accumulator sets keep two FMA chains in flight per row. The scale goes either on each
// block's sums (kScaleSums) or on the decoded weights. One or two rows are bound by the decoding,
// where the former saves the multiplies; more rows by the FMAs, where it costs a second set of
// accumulators. The AVX2 copy, 2048 x 2048 on one Zen 3 core, sums against weights: 1 row 430 /
// 490 us, 2 rows 525 / 565, 4 rows 775 / 750, 8 rows 1630 / 1485.
template <typename V, int M>
void gemv_rows(const uint8_t* packed, const BlockScales& scales, const typename V::Codes& codes,
               int shift, int64_t in, const float* x, int64_t row_begin, int64_t row_end, float* y,
               int64_t ldy) {
  using Reg = typename V::Reg;
  constexpr int kSets = M >= 8 ? 1 : 2;
  constexpr bool kScaleSums = M <= 2;
  constexpr int kLanes = 32 / V::kVectors;
  for (int64_t o = row_begin; o < row_end; ++o) {
    Reg acc[kSets][M], total[M];
    for (int j = 0; j < M; ++j) {
      total[j] = V::zero();
      for (int s = 0; s < kSets; ++s) acc[s][j] = V::zero();
    }
    const auto sets_sum = [&](int j) {
      return kSets == 2 ? V::add(acc[0][j], acc[kSets - 1][j]) : acc[0][j];
    };
    const int64_t row = o * in;
    for (int64_t k = 0; k < in;) {
      const int64_t block = (row + k) >> shift;
      const int64_t block_end = std::min(in, ((block + 1) << shift) - row);
      const Reg scale = V::set1(block_scale(scales, block));
      for (; k < block_end; k += 32) {
        Reg w[V::kVectors];
        V::decode32(packed + (row + k) / 2, codes, w);
        if constexpr (!kScaleSums)
          for (int v = 0; v < V::kVectors; ++v) w[v] = V::mul(w[v], scale);
        for (int j = 0; j < M; ++j) {
          const float* xj = x + j * in + k;
          for (int v = 0; v < V::kVectors; ++v)
            acc[v % kSets][j] = V::fmadd(w[v], V::load(xj + kLanes * v), acc[v % kSets][j]);
        }
      }
      if constexpr (kScaleSums) {
        for (int j = 0; j < M; ++j) {
          total[j] = V::fmadd(sets_sum(j), scale, total[j]);
          for (int s = 0; s < kSets; ++s) acc[s][j] = V::zero();
        }
      }
    }
    for (int j = 0; j < M; ++j) y[j * ldy + o] = V::sum(kScaleSums ? total[j] : sets_sum(j));
  }
}

// Every input row of x, in passes of gemv_rows (the contract of nf4_gemv.h).
template <typename V>
void gemv(const uint8_t* packed, const BlockScales& scales, const typename V::Codes& codes,
          int64_t blocksize, int64_t in, const float* x, int64_t m, int64_t row_begin,
          int64_t row_end, float* y, int64_t ldy) {
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  for_each_row_pass(m, [&](auto rows, int64_t i) {
    gemv_rows<V, decltype(rows)::value>(packed, scales, codes, shift, in, x + i * in, row_begin,
                                        row_end, y + i * ldy, ldy);
  });
}

}  // namespace lorakit::lora
