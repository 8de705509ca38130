// Per-element helpers of the AdamW CPU kernels: parameter types, the update formula and the
// nearest-code lookup. Like adamw_kernels_impl.h, which includes it, this header is compiled once
// per instruction set, inside that copy's namespace (LORAKIT_OPTIM_ISA).
#pragma once

#include <cstdint>
#include <cstring>

#include "optim/adamw_kernels.h"

#ifndef LORAKIT_OPTIM_ISA
#error "define LORAKIT_OPTIM_ISA before including adamw_scalar.h"
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

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float sqrt_f(float x) { return __builtin_sqrtf(x); }

// One element of the update, given the float32 moments m, v: returns the new parameter and
// updates m and v in place.
struct Moments {
  float m, v;
};
inline float update(float param, float grad, Moments& mv, const AdamWScalars& c) {
  const float g = grad * c.grad_scale;
  mv.m = mv.m + c.one_minus_b1 * (g - mv.m);
  mv.v = mv.v * c.beta2 + (c.one_minus_b2 * g) * g;
  const float denom = sqrt_f(mv.v) / c.bc2_sqrt + c.eps;
  return param * c.decay + (c.neg_step_size * mv.m) / denom;
}

// |x|'s bits; for |x| these order like the values, and every NaN above +inf, so an integer max
// over them is the absolute maximum with a NaN winning (blockwise8's absmax rule).
inline uint32_t abs_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }

// The CodeTables bucket of the value with bits u, and its key within the bucket (see CodeTables).
inline uint32_t bucket_of(uint32_t u) { return u >> CodeTables::kBucketShift; }
inline uint32_t key_of(uint32_t u) { return (u & 0xFFFFu) ^ (u >> 31 ? 0xFFFFu : 0u); }

// blockwise8::inverse_absmax, restated in this instruction set's namespace: an inline function
// shared by translation units built with different ISA flags is merged by the linker into one
// copy, possibly an AVX2-compiled one that the baseline path would then run. What a block's values
// are multiplied by before the nearest-code lookup; a zero block takes 1 / kMinScale, and a NaN
// maximum stays NaN and sends the whole block to code 255.
inline float inverse_absmax(float absmax) {
  return 1.0f / (absmax < kMinScale ? kMinScale : absmax);
}

// Index of the code nearest y (ties to the lower code, NaN to 255): blockwise8::nearest_code,
// through the bucket table when the code allows it.
inline uint8_t quantize(float y, const CodeTables& t) {
  if (!t.exact) return nearest_code_slow(y, t);
  const uint32_t u = bits_of(y);
  const uint32_t entry = t.lut[bucket_of(u)];
  const uint32_t idx = (entry & 0xFFu) + (key_of(u) > entry >> 8 ? 1u : 0u);
  return static_cast<uint8_t>(y != y ? 255u : idx);
}

}  // namespace
}  // namespace lorakit::optim::LORAKIT_OPTIM_ISA
