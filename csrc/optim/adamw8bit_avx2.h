// The 8-bit AdamW step of one full block, spelled out in AVX2: gcc leaves the table lookups and
// the block maximum scalar. Computes exactly what step_8bit_block in adamw_kernels_impl.h does
// (the same float32 operations in the same order; see adamw_scalar.h), eight elements at a time.
// Compiled only into the avx2 copy (LORAKIT_OPTIM_ISA), with -mavx2 -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "optim/adamw_kernels.h"
#include "optim/adamw_scalar.h"

namespace lorakit::optim::LORAKIT_OPTIM_ISA {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const _Float16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const BFloat16Bits* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(_Float16* p, __m256 x) {
  const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
// store(BFloat16Bits*) of adamw_scalar.h, eight at a time.
inline void store8(BFloat16Bits* p, __m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// code[q[0..7]]. Eight scalar loads beat a gather here (2.1 against 3.3 ns per eight values on
// this machine's Zen 3 cores, whose gathers are microcoded).
inline __m256 lookup8(const float* code, const uint8_t* q) {
  return _mm256_setr_ps(code[q[0]], code[q[1]], code[q[2]], code[q[3]], code[q[4]], code[q[5]],
                        code[q[6]], code[q[7]]);
}

inline float max_lane_bits(__m256i x) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtss_f32(_mm_castsi128_ps(m));
}

// q[i] = quantize(x[i] * inverse, t) for a full block; t.exact must hold.
inline void quantize_block8(const float* __restrict x, float inverse, const CodeTables& t,
                            uint8_t* __restrict q) {
  const __m256 vinverse = _mm256_set1_ps(inverse);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i byte_mask = _mm256_set1_epi32(0xFF);
  const auto* lut = reinterpret_cast<const int*>(t.lut);
  for (int64_t i = 0; i < kBlocksize; i += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinverse);
    const __m256i u = _mm256_castps_si256(y);
    const __m256i entry =
        _mm256_i32gather_epi32(lut, _mm256_srli_epi32(u, CodeTables::kBucketShift), 4);
    // base + (key_of(u) > threshold); both sides < 2^16, so the signed compare is exact. The key
    // flips the low bits of negative values: u ^ (all ones where the sign bit is set).
    const __m256i key = _mm256_and_si256(_mm256_xor_si256(u, _mm256_srai_epi32(u, 31)), low16);
    const __m256i above = _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 8));
    __m256i idx = _mm256_sub_epi32(_mm256_and_si256(entry, byte_mask), above);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    idx = _mm256_or_si256(idx, _mm256_and_si256(nan, byte_mask));
    // Pack the eight 32-bit indices (< 256) to bytes.
    const __m128i words =
        _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(words, words));
  }
}

// step_8bit_block of adamw_kernels_impl.h for a full block (kBlocksize elements) whose code
// tables are both exact.
template <typename T>
void step_8bit_full_block(T* __restrict param, const T* __restrict grad, uint8_t* __restrict qm,
                          float* __restrict absmax_m, uint8_t* __restrict qv,
                          float* __restrict absmax_v, const CodeTables& mc, const CodeTables& vc,
                          const AdamWScalars& s) {
  alignas(32) float m[kBlocksize];
  alignas(32) float v[kBlocksize];
  const __m256 old_m_scale = _mm256_set1_ps(*absmax_m);
  const __m256 old_v_scale = _mm256_set1_ps(*absmax_v);
  const __m256 grad_scale = _mm256_set1_ps(s.grad_scale);
  const __m256 one_minus_b1 = _mm256_set1_ps(s.one_minus_b1);
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_b2 = _mm256_set1_ps(s.one_minus_b2);
  const __m256 bc2_sqrt = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps);
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256 neg_step_size = _mm256_set1_ps(s.neg_step_size);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m_max = _mm256_setzero_si256();  // abs_bits maxima (adamw_scalar.h), eight lanes
  __m256i v_max = _mm256_setzero_si256();
  for (int64_t i = 0; i < kBlocksize; i += 8) {
    const __m256 m_old = _mm256_mul_ps(lookup8(mc.code, qm + i), old_m_scale);
    const __m256 v_old = _mm256_mul_ps(lookup8(vc.code, qv + i), old_v_scale);
    // update() of adamw_scalar.h
    const __m256 g = _mm256_mul_ps(load8(grad + i), grad_scale);
    const __m256 mi = _mm256_add_ps(m_old, _mm256_mul_ps(one_minus_b1, _mm256_sub_ps(g, m_old)));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v_old, beta2),
                                    _mm256_mul_ps(_mm256_mul_ps(one_minus_b2, g), g));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2_sqrt), eps);
    const __m256 p = _mm256_mul_ps(load8(param + i), decay);
    store8(param + i, _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step_size, mi), denom)));
    _mm256_store_ps(m + i, mi);
    _mm256_store_ps(v + i, vi);
    // Signed max is exact: abs bits are below 2^31.
    m_max = _mm256_max_epi32(m_max, _mm256_and_si256(_mm256_castps_si256(mi), abs_mask));
    v_max = _mm256_max_epi32(v_max, _mm256_and_si256(_mm256_castps_si256(vi), abs_mask));
  }
  const float new_m_max = max_lane_bits(m_max);
  const float new_v_max = max_lane_bits(v_max);
  *absmax_m = new_m_max;
  *absmax_v = new_v_max;
  quantize_block8(m, inverse_absmax(new_m_max), mc, qm);
  quantize_block8(v, inverse_absmax(new_v_max), vc, qv);
}

}  // namespace
}  // namespace lorakit::optim::LORAKIT_OPTIM_ISA
