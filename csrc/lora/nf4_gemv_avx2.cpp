#include "lora/nf4_gemv_avx2.h"

#include <immintrin.h>

#include "nf4/nf4_code.h"

namespace lorakit::lora {

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

namespace {

// The NF4 code of each 32-bit lane's index (0..15): two 8-entry permutes, picked by bit 3.
inline __m256 lookup(__m256i idx, __m256 low_codes, __m256 high_codes) {
  const __m256 low = _mm256_permutevar8x32_ps(low_codes, idx);
  const __m256 high = _mm256_permutevar8x32_ps(high_codes, idx);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// M input rows at once, so each group of 16 weights is decoded once for all of them. Below 8
// rows, two accumulator sets (even / odd positions) keep two FMA chains in flight per row.
template <int M>
void gemv_rows(const uint8_t* packed, const float* absmax, int shift, int64_t in, const float* x,
               int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  constexpr int kSets = M >= 8 ? 1 : 2;
  const __m256 low_codes = _mm256_loadu_ps(nf4::kCode);
  const __m256 high_codes = _mm256_loadu_ps(nf4::kCode + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0x0F);
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m256 acc[kSets][M];
    for (int s = 0; s < kSets; ++s)
      for (int j = 0; j < M; ++j) acc[s][j] = _mm256_setzero_ps();
    const int64_t row = o * in;
    // The 16 codes times the current block's scale, rebuilt when a new block starts.
    int64_t block = -1;
    __m256 low = low_codes, high = high_codes;
    for (int64_t k = 0; k < in; k += 16) {
      if (((row + k) >> shift) != block) {
        block = (row + k) >> shift;
        const __m256 scale = _mm256_set1_ps(absmax[block]);
        low = _mm256_mul_ps(low_codes, scale);
        high = _mm256_mul_ps(high_codes, scale);
      }
      const __m128i bytes =
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (row + k) / 2));
      const __m256i q = _mm256_cvtepu8_epi32(bytes);
      // Byte p holds element 2p in its high nibble and 2p + 1 in its low one.
      const __m256 even = lookup(_mm256_srli_epi32(q, 4), low, high);
      const __m256 odd = lookup(_mm256_and_si256(q, low_nibble), low, high);
      for (int j = 0; j < M; ++j) {
        const float* xj = x + j * in + k;
        acc[0][j] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xj), acc[0][j]);
        acc[kSets - 1][j] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xj + 8), acc[kSets - 1][j]);
      }
    }
    for (int j = 0; j < M; ++j) {
      const __m256 total = kSets == 2 ? _mm256_add_ps(acc[0][j], acc[kSets - 1][j]) : acc[0][j];
      y[j * ldy + o] = horizontal_sum(total);
    }
  }
}

}  // namespace

void nf4_gemv_avx2(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy) {
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  for (int64_t i = 0; i < m;) {
    const float* xi = x + i * in;
    float* yi = y + i * ldy;
    const int64_t left = m - i;
    if (left >= 8) {
      gemv_rows<8>(packed, absmax, shift, in, xi, row_begin, row_end, yi, ldy);
      i += 8;
    } else if (left >= 4) {
      gemv_rows<4>(packed, absmax, shift, in, xi, row_begin, row_end, yi, ldy);
      i += 4;
    } else if (left >= 2) {
      gemv_rows<2>(packed, absmax, shift, in, xi, row_begin, row_end, yi, ldy);
      i += 2;
    } else {
      gemv_rows<1>(packed, absmax, shift, in, xi, row_begin, row_end, yi, ldy);
      i += 1;
    }
  }
}

void deinterleave16(const float* src, int64_t n, float* dst) {
  for (int64_t g = 0; g < n; g += 16)
    for (int p = 0; p < 8; ++p) {
      dst[g + p] = src[g + 2 * p];
      dst[g + 8 + p] = src[g + 2 * p + 1];
    }
}

}  // namespace lorakit::lora
