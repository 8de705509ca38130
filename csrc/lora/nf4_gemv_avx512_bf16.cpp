#include <algorithm>
#include <cstring>

#include "lora/gemv_row_passes.h"
#include "lora/nf4_code_bf16.h"
#include "lora/nf4_gemv.h"
#include "nf4/nf4_avx512.h"

namespace lorakit::lora {
namespace {

inline __m512bh as_bf16(__m512i v) {
  __m512bh r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// M input rows per pass. Each 32 weights are decoded once, into bf16 codes by one permute, then
// meet each row in one dot-product instruction (32 products, summed pairwise into 16 float32
// lanes); a block's sums are scaled once at its end. Two accumulator sets below 8 rows keep two
// dot-product chains in flight.
template <int M>
void gemv_rows(const uint8_t* packed, const BlockScales& scales, __m512i codes, int shift,
               int64_t in, const uint16_t* x, int64_t row_begin, int64_t row_end, float* y,
               int64_t ldy) {
  constexpr int kSets = M >= 8 ? 1 : 2;
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m512 total[M];
    for (int j = 0; j < M; ++j) total[j] = _mm512_setzero_ps();
    const int64_t row = o * in;
    for (int64_t k = 0; k < in;) {
      const int64_t block = (row + k) >> shift;
      const int64_t block_end = std::min(in, ((block + 1) << shift) - row);
      __m512 acc[kSets][M];
      for (int j = 0; j < M; ++j)
        for (int s = 0; s < kSets; ++s) acc[s][j] = _mm512_setzero_ps();
      for (int step = 0; k < block_end; k += 32, ++step) {
        __m128i first, second;
        nf4::nibbles32(packed + (row + k) / 2, first, second);
        const __m512bh w = as_bf16(_mm512_permutexvar_epi16(nf4::widen16(first, second), codes));
        for (int j = 0; j < M; ++j) {
          const __m512bh xj = as_bf16(_mm512_loadu_si512(x + j * in + k));
          acc[step % kSets][j] = _mm512_dpbf16_ps(acc[step % kSets][j], w, xj);
        }
      }
      const __m512 scale = _mm512_set1_ps(block_scale(scales, block));
      for (int j = 0; j < M; ++j) {
        const __m512 sum = kSets == 2 ? _mm512_add_ps(acc[0][j], acc[kSets - 1][j]) : acc[0][j];
        total[j] = _mm512_fmadd_ps(sum, scale, total[j]);
      }
    }
    for (int j = 0; j < M; ++j) y[j * ldy + o] = nf4::horizontal_sum(total[j]);
  }
}

}  // namespace

void nf4_gemv_avx512_bf16(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                          int64_t in, const uint16_t* x, int64_t m, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy) {
  uint16_t table[32] = {};  // the permute indexes 32 entries; codes fill the first 16
  for (int i = 0; i < 16; ++i) table[i] = kCodeBf16Bits[i];
  const __m512i codes = _mm512_loadu_si512(table);
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  for_each_row_pass(m, [&](auto rows, int64_t i) {
    gemv_rows<decltype(rows)::value>(packed, scales, codes, shift, in, x + i * in, row_begin,
                                     row_end, y + i * ldy, ldy);
  });
}

}  // namespace lorakit::lora
