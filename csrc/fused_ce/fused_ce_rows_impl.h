// The body of the CPU row kernel. Included only by fused_ce_rows_{baseline,avx2,avx512}.cpp, each
// of which defines LORAKIT_FUSED_CE_ISA to the namespace of its copy. The loops are written so that
// gcc vectorises them: no calls (exp is the polynomial below), no branches, reductions kept in
// kLanes separate accumulators (float addition is not associative, so gcc would not reorder one
// accumulator's sums itself).
//
// Per row z (vocab values, soft-capped first when softcap > 0: z <- c tanh(z / c)), label y:
//   lse = m + log sum_v exp(z_v - m),  m = max_v z_v
//   logprob = z_y - lse
//   grad_v = k (exp(z_v - lse) - [v = y]) (1 - (z_v / c)^2 with softcap),  k = scale * row_scale
// which is d(-logprob)/dz times k, written over the logits.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_ce/fused_ce_rows.h"

#ifndef LORAKIT_FUSED_CE_ISA
#error "define LORAKIT_FUSED_CE_ISA before including fused_ce_rows_impl.h"
#endif

namespace lorakit::fused_ce::LORAKIT_FUSED_CE_ISA {
namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;  // one AVX-512 register of float32
#else
constexpr int kLanes = 8;  // one AVX2 register of float32; two SSE ones
#endif

// bfloat16 as its bits; float16 as gcc's _Float16 (IEEE binary16, c10::Half's layout).
struct BF16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(BF16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.bits) << 16);
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline _Float16 from_float<_Float16>(float x) {
  return static_cast<_Float16>(x);
}
template <>
inline BF16 from_float<BF16>(float x) {
  // Round to nearest even, as c10::BFloat16 does; a NaN stays a (quiet) NaN.
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>(x != x ? (u >> 16) | 0x40u : rounded)};
}

// exp(x) for x in float32, within 2 ulp on [-87, 88] (Cephes' expf: x = n ln 2 + r with
// |r| <= ln 2 / 2, a degree-6 polynomial for exp(r), then 2^n through the exponent bits). Inputs
// are clamped to that range: exp(-87) ~ 1.6e-38 stands in for anything smaller, which a sum of
// terms the largest of which is 1 never notices. NaN propagates through the arithmetic.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  return y * __builtin_bit_cast(float, static_cast<uint32_t>(e) << 23);
}

// c tanh(z / c) = c (1 - 2 / (exp(2 z / c) + 1)); `inv` is 1 / c.
template <bool kCap>
inline float cap(float z, float c, float inv) {
  if constexpr (kCap) return c - 2.0f * c / (fast_exp(2.0f * z * inv) + 1.0f);
  return z;
}

template <typename T, bool kCap>
void one_row(T* __restrict z, int64_t row, const RowArgs& a) {
  const int64_t n = a.vocab;
  const float c = a.softcap, inv = kCap ? 1.0f / a.softcap : 0.0f;
  const int64_t body = n - n % kLanes;

  // Pass 1: the maximum, and poison = sum 0 * z, which is NaN exactly when some z is not finite
  // (the comparisons of the max would drop a NaN silently).
  float mx[kLanes], poison[kLanes];
  for (int k = 0; k < kLanes; ++k) mx[k] = -__builtin_inff(), poison[k] = 0.0f;
  for (int64_t j = 0; j < body; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float v = cap<kCap>(to_float(z[j + k]), c, inv);
      mx[k] = v > mx[k] ? v : mx[k];
      poison[k] += v * 0.0f;
    }
  }
  for (int64_t j = body; j < n; ++j) {
    const float v = cap<kCap>(to_float(z[j]), c, inv);
    mx[0] = v > mx[0] ? v : mx[0];
    poison[0] += v * 0.0f;
  }
  float m = mx[0], bad = poison[0];
  for (int k = 1; k < kLanes; ++k) m = mx[k] > m ? mx[k] : m, bad += poison[k];

  // Pass 2: the sum of exp(z - m), each term at most 1.
  float acc[kLanes] = {};
  for (int64_t j = 0; j < body; j += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += fast_exp(cap<kCap>(to_float(z[j + k]), c, inv) - m);
  for (int64_t j = body; j < n; ++j) acc[0] += fast_exp(cap<kCap>(to_float(z[j]), c, inv) - m);
  float sum = 0.0f;
  for (int k = 0; k < kLanes; ++k) sum += acc[k];
  const float lse = m + std::log(sum) + bad;

  const int64_t y = a.labels[row];
  const bool ignored = y == kIgnoreIndex;
  const float zy = ignored ? 0.0f : cap<kCap>(to_float(z[y]), c, inv);
  a.logprobs[row] = ignored ? 0.0f : zy - lse;
  if (!a.write_grad) return;

  // Pass 3: the gradient over the logits, in place; the label's entry is fixed afterwards.
  const float k = ignored ? 0.0f : a.scale * (a.row_scale ? a.row_scale[row] : 1.0f);
  if (k == 0.0f) {
    for (int64_t j = 0; j < n; ++j) z[j] = from_float<T>(0.0f);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = cap<kCap>(to_float(z[j]), c, inv);
    float g = k * fast_exp(v - lse);
    if constexpr (kCap) g *= 1.0f - (v * inv) * (v * inv);
    z[j] = from_float<T>(g);
  }
  float gy = k * (fast_exp(zy - lse) - 1.0f);
  if constexpr (kCap) gy *= 1.0f - (zy * inv) * (zy * inv);
  z[y] = from_float<T>(gy);
}

template <typename T>
void rows_of(T* logits, int64_t first, int64_t last, const RowArgs& a) {
  for (int64_t row = first; row < last; ++row) {
    T* z = logits + row * a.vocab;
    if (a.softcap > 0.0f)
      one_row<T, true>(z, row, a);
    else
      one_row<T, false>(z, row, a);
  }
}

}  // namespace

void logprob_rows(LogitType type, void* logits, int64_t first, int64_t last, const RowArgs& args) {
  switch (type) {
    case LogitType::kFloat:
      return rows_of(static_cast<float*>(logits), first, last, args);
    case LogitType::kHalf:
      return rows_of(static_cast<_Float16*>(logits), first, last, args);
    case LogitType::kBFloat16:
      return rows_of(static_cast<BF16*>(logits), first, last, args);
  }
}

}  // namespace lorakit::fused_ce::LORAKIT_FUSED_CE_ISA
