// Helpers of the AVX-512 NF4 kernels: nibble indices for table lookups by permute, and a sum
// across lanes. Included only by
// translation units compiled for AVX-512; internal linkage keeps each unit's copy its own.
#pragma once

#include <cstdint>

#include "common/simd_x86.h"

namespace lorakit::nf4 {
namespace {  // NOLINT(google-build-namespaces): per-unit copies, see above

// The 32 nibble indices of 16 packed bytes, in element order (high nibble first): elements 0-15
// in `first`, 16-31 in `second`.
inline void nibbles32(const uint8_t* bytes, __m128i& first, __m128i& second) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low_nibble);
  const __m128i lo = _mm_and_si128(v, low_nibble);
  first = _mm_unpacklo_epi8(hi, lo);
  second = _mm_unpackhi_epi8(hi, lo);
}

// 16 indices widened to 32 bits (in two steps: SIMDe lacks the one-step widening).
inline __m512i widen32(__m128i idx) { return _mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(idx)); }

// 32 indices widened to 16 bits (sign extension is zero extension below 16).
inline __m512i widen16(__m128i first, __m128i second) {
  return _mm512_cvtepi8_epi16(_mm256_set_m128i(second, first));
}

inline float horizontal_sum(__m512 v) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), high);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace lorakit::nf4
