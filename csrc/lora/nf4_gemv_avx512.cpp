#include <algorithm>

#include "lora/gemv_row_passes.h"
#include "lora/nf4_gemv.h"
#include "nf4/nf4_avx512.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {
namespace {

// The unscaled codes of the 32 weights in 16 packed bytes, in order: one permute per 16 looks
// them up in the 16-entry table held in one register.
inline void decode32(const uint8_t* bytes, __m512 codes, __m512 w[2]) {
  __m128i first, second;
  nf4::nibbles32(bytes, first, second);
  w[0] = _mm512_permutexvar_ps(nf4::widen32(first), codes);
  w[1] = _mm512_permutexvar_ps(nf4::widen32(second), codes);
}

// As the AVX2 kernel's gemv_rows (nf4_gemv_avx2.cpp, which says why): M input rows per pass, two
// accumulator sets below 8 rows, the scale on each block's sums for one or two rows.
template <int M>
void gemv_rows(const uint8_t* packed, const BlockScales& scales, __m512 codes, int shift,
               int64_t in, const float* x, int64_t row_begin, int64_t row_end, float* y,
               int64_t ldy) {
  constexpr int kSets = M >= 8 ? 1 : 2;
  constexpr bool kScaleSums = M <= 2;
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m512 acc[kSets][M], total[M];
    for (int j = 0; j < M; ++j) {
      total[j] = _mm512_setzero_ps();
      for (int s = 0; s < kSets; ++s) acc[s][j] = _mm512_setzero_ps();
    }
    const auto sets_sum = [&](int j) {
      return kSets == 2 ? _mm512_add_ps(acc[0][j], acc[kSets - 1][j]) : acc[0][j];
    };
    const int64_t row = o * in;
    for (int64_t k = 0; k < in;) {
      const int64_t block = (row + k) >> shift;
      const int64_t block_end = std::min(in, ((block + 1) << shift) - row);
      const __m512 scale = _mm512_set1_ps(block_scale(scales, block));
      for (; k < block_end; k += 32) {
        __m512 w[2];
        decode32(packed + (row + k) / 2, codes, w);
        if constexpr (!kScaleSums)
          for (int v = 0; v < 2; ++v) w[v] = _mm512_mul_ps(w[v], scale);
        for (int j = 0; j < M; ++j) {
          const float* xj = x + j * in + k;
          for (int v = 0; v < 2; ++v)
            acc[v % kSets][j] =
                _mm512_fmadd_ps(w[v], _mm512_loadu_ps(xj + 16 * v), acc[v % kSets][j]);
        }
      }
      if constexpr (kScaleSums) {
        for (int j = 0; j < M; ++j) {
          total[j] = _mm512_fmadd_ps(sets_sum(j), scale, total[j]);
          for (int s = 0; s < kSets; ++s) acc[s][j] = _mm512_setzero_ps();
        }
      }
    }
    for (int j = 0; j < M; ++j)
      y[j * ldy + o] = nf4::horizontal_sum(kScaleSums ? total[j] : sets_sum(j));
  }
}

}  // namespace

void nf4_gemv_avx512(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                     int64_t in, const float* x, int64_t m, int64_t row_begin, int64_t row_end,
                     float* y, int64_t ldy) {
  const __m512 codes = _mm512_loadu_ps(nf4::kCode);
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  for_each_row_pass(m, [&](auto rows, int64_t i) {
    gemv_rows<decltype(rows)::value>(packed, scales, codes, shift, in, x + i * in, row_begin,
                                     row_end, y + i * ldy, ldy);
  });
}

}  // namespace lorakit::lora
