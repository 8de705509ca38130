// The AdamW kernels' bodies. Included only by adamw_kernels_{baseline,avx2}.cpp, each of which
// defines LORAKIT_OPTIM_ISA to the namespace its copy lives in. Loops are written so that gcc
// vectorises them (no reductions across lanes, no calls, no branches in the hot loops).
//
// Per element, in torch.optim.AdamW's order (single-tensor path), all in float32:
//   g = grad * grad_scale
//   p = p * (1 - lr * wd)
//   m = m + (1 - b1) * (g - m)                     (torch's lerp for weights below 0.5)
//   v = v * b2 + ((1 - b2) * g) * g               (mul_ then addcmul_)
//   p = p + (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)   (addcdiv_)
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "optim/adamw_kernels.h"

#ifndef LORAKIT_OPTIM_ISA
#error "define LORAKIT_OPTIM_ISA before including adamw_kernels_impl.h"
#endif

namespace lorakit::optim::LORAKIT_OPTIM_ISA {
namespace {

struct BFloat16Bits {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(BFloat16Bits x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* dst, float x) { *dst = x; }
inline void store(_Float16* dst, float x) { *dst = static_cast<_Float16>(x); }
// Round to nearest even, NaN kept a (quiet) NaN: the rounding torch uses for bfloat16.
inline void store(BFloat16Bits* dst, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  dst->bits = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

constexpr int kBucketShift = 23 - CodeTables::kLutMantissaBits;

inline float sqrt_f(float x) { return __builtin_sqrtf(x); }

template <typename T>
void step_32bit(T* __restrict param, const T* __restrict grad, float* __restrict m,
                float* __restrict v, int64_t n, const AdamWScalars& s) {
  const AdamWScalars c = s;  // locals, so the compiler knows they do not alias the arrays
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(grad[i]) * c.grad_scale;
    const float mi = m[i] + c.one_minus_b1 * (g - m[i]);
    const float vi = v[i] * c.beta2 + (c.one_minus_b2 * g) * g;
    const float denom = sqrt_f(vi) / c.bc2_sqrt + c.eps;
    const float p = to_float(param[i]) * c.decay;
    store(param + i, p + (c.neg_step_size * mi) / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

// Index of the code nearest y (ties to the lower code, NaN to 255): the same rule as
// blockwise8::nearest_code, through the bucket table (see CodeTables).
inline int bucket_of(uint32_t u) {
  constexpr int64_t first = int64_t{CodeTables::kLowestExponent} << CodeTables::kLutMantissaBits;
  const int64_t b = static_cast<int64_t>((u & 0x7FFFFFFFu) >> kBucketShift) - first;
  const int64_t clamped = b < 0 ? 0 : (b >= CodeTables::kBuckets ? CodeTables::kBuckets - 1 : b);
  return static_cast<int>(clamped + (u >> 31) * CodeTables::kBuckets);
}

inline uint8_t quantize(float y, const CodeTables& t) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof u);
  int idx = t.lut[bucket_of(u)];
  for (int k = 0; k < t.fixups; ++k) idx += y > t.midpoints[idx] ? 1 : 0;
  return static_cast<uint8_t>(y != y ? 255 : idx);
}

// q[i] = quantize(x[i] / scale) for len values.
inline void quantize_block(const float* __restrict x, float scale, int64_t len, const CodeTables& t,
                           uint8_t* __restrict q) {
  int64_t i = 0;
#ifdef __AVX2__
  // gcc does not vectorise the table lookups (byte gathers), so the AVX2 copy spells them out for
  // the usual single fix-up step; it computes exactly what quantize() does.
  if (t.fixups == 1) {
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i first =
        _mm256_set1_epi32(CodeTables::kLowestExponent << CodeTables::kLutMantissaBits);
    const __m256i last = _mm256_set1_epi32(CodeTables::kBuckets - 1);
    const __m256i buckets = _mm256_set1_epi32(CodeTables::kBuckets);
    const __m256i byte_mask = _mm256_set1_epi32(0xFF);
    const auto* lut = reinterpret_cast<const int*>(t.lut);
    for (; i + 8 <= len; i += 8) {
      const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), vscale);
      const __m256i u = _mm256_castps_si256(y);
      __m256i b =
          _mm256_sub_epi32(_mm256_srli_epi32(_mm256_and_si256(u, abs_mask), kBucketShift), first);
      b = _mm256_min_epi32(_mm256_max_epi32(b, _mm256_setzero_si256()), last);
      b = _mm256_add_epi32(b, _mm256_mullo_epi32(_mm256_srli_epi32(u, 31), buckets));
      // 4-byte gathers at byte offsets; the low byte is the entry (lut is padded by 3 bytes).
      __m256i idx = _mm256_and_si256(_mm256_i32gather_epi32(lut, b, 1), byte_mask);
      const __m256 mid = _mm256_i32gather_ps(t.midpoints, idx, 4);
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(y, mid, _CMP_GT_OQ)));
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
      idx = _mm256_or_si256(idx, _mm256_and_si256(nan, byte_mask));
      // Pack the eight 32-bit indices (< 256) to bytes.
      const __m128i lo = _mm256_castsi256_si128(idx);
      const __m128i hi = _mm256_extracti128_si256(idx, 1);
      const __m128i words = _mm_packus_epi32(lo, hi);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(words, words));
    }
  }
#endif
  for (; i < len; ++i) q[i] = quantize(x[i] / scale, t);
}

constexpr int kLanes = 8;  // independent running maxima, so the max loop vectorises exactly

// Max that keeps a NaN once seen (the blockwise8 rule: a NaN makes its block's absmax NaN).
inline float sticky_nan_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }

// One block of `len` <= kBlocksize elements: dequantize both moments, update them and the
// parameter in float32, then requantize with the block's new absolute maxima.
template <typename T>
void step_8bit_block(T* __restrict param, const T* __restrict grad, uint8_t* __restrict qm,
                     float* __restrict absmax_m, uint8_t* __restrict qv, float* __restrict absmax_v,
                     int64_t len, const CodeTables& mc, const CodeTables& vc,
                     const AdamWScalars& s) {
  const AdamWScalars c = s;
  alignas(64) float m[kBlocksize];
  alignas(64) float v[kBlocksize];
  const float old_m_scale = *absmax_m;
  const float old_v_scale = *absmax_v;
  for (int64_t i = 0; i < len; ++i) {
    m[i] = mc.code[qm[i]] * old_m_scale;
    v[i] = vc.code[qv[i]] * old_v_scale;
  }
  for (int64_t i = 0; i < len; ++i) {
    const float g = to_float(grad[i]) * c.grad_scale;
    const float mi = m[i] + c.one_minus_b1 * (g - m[i]);
    const float vi = v[i] * c.beta2 + (c.one_minus_b2 * g) * g;
    const float denom = sqrt_f(vi) / c.bc2_sqrt + c.eps;
    const float p = to_float(param[i]) * c.decay;
    store(param + i, p + (c.neg_step_size * mi) / denom);
    m[i] = mi;
    v[i] = vi;
  }
  float m_lanes[kLanes] = {};
  float v_lanes[kLanes] = {};
  const int64_t full = len / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      m_lanes[j] = sticky_nan_max(m_lanes[j], __builtin_fabsf(m[i + j]));
      v_lanes[j] = sticky_nan_max(v_lanes[j], v[i + j]);  // v >= 0 (or NaN)
    }
  }
  for (int64_t i = full; i < len; ++i) {
    m_lanes[0] = sticky_nan_max(m_lanes[0], __builtin_fabsf(m[i]));
    v_lanes[0] = sticky_nan_max(v_lanes[0], v[i]);
  }
  float m_max = 0.0f, v_max = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    m_max = sticky_nan_max(m_max, m_lanes[j]);
    v_max = sticky_nan_max(v_max, v_lanes[j]);
  }
  *absmax_m = m_max;
  *absmax_v = v_max;
  // A zero block is divided by the smallest normal-ish scale instead of 0 (blockwise8's rule).
  const float m_scale = m_max < kMinScale ? kMinScale : m_max;
  const float v_scale = v_max < kMinScale ? kMinScale : v_max;
  quantize_block(m, m_scale, len, mc, qm);
  quantize_block(v, v_scale, len, vc, qv);
}

template <typename T>
void step_8bit(T* param, const T* grad, uint8_t* qm, float* absmax_m, uint8_t* qv, float* absmax_v,
               int64_t n, int64_t first_block, int64_t last_block, const CodeTables& mc,
               const CodeTables& vc, const AdamWScalars& s) {
  for (int64_t b = first_block; b < last_block; ++b) {
    const int64_t start = b * kBlocksize;
    const int64_t len = n - start < kBlocksize ? n - start : kBlocksize;
    step_8bit_block(param + start, grad + start, qm + start, absmax_m + b, qv + start, absmax_v + b,
                    len, mc, vc, s);
  }
}

}  // namespace

void adamw_step(ParamType type, void* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                int64_t n, const AdamWScalars& s) {
  switch (type) {
    case ParamType::kFloat:
      return step_32bit(static_cast<float*>(param), static_cast<const float*>(grad), exp_avg,
                        exp_avg_sq, n, s);
    case ParamType::kHalf:
      return step_32bit(static_cast<_Float16*>(param), static_cast<const _Float16*>(grad), exp_avg,
                        exp_avg_sq, n, s);
    case ParamType::kBFloat16:
      return step_32bit(static_cast<BFloat16Bits*>(param), static_cast<const BFloat16Bits*>(grad),
                        exp_avg, exp_avg_sq, n, s);
  }
}

void adamw8bit_step(ParamType type, void* param, const void* grad, uint8_t* exp_avg,
                    float* exp_avg_absmax, uint8_t* exp_avg_sq, float* exp_avg_sq_absmax, int64_t n,
                    int64_t first_block, int64_t last_block, const CodeTables& m_codes,
                    const CodeTables& v_codes, const AdamWScalars& s) {
  switch (type) {
    case ParamType::kFloat:
      return step_8bit(static_cast<float*>(param), static_cast<const float*>(grad), exp_avg,
                       exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, n, first_block, last_block,
                       m_codes, v_codes, s);
    case ParamType::kHalf:
      return step_8bit(static_cast<_Float16*>(param), static_cast<const _Float16*>(grad), exp_avg,
                       exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, n, first_block, last_block,
                       m_codes, v_codes, s);
    case ParamType::kBFloat16:
      return step_8bit(static_cast<BFloat16Bits*>(param), static_cast<const BFloat16Bits*>(grad),
                       exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, n, first_block,
                       last_block, m_codes, v_codes, s);
  }
}

}  // namespace lorakit::optim::LORAKIT_OPTIM_ISA
