// The AdamW kernels' bodies. Included only by adamw_kernels_{baseline,avx2,avx512}.cpp, each of
// which defines LORAKIT_OPTIM_ISA to the namespace its copy lives in. Loops are written so that
// gcc vectorises them (no reductions across lanes, no calls, no branches in the hot loops), except
// the 8-bit step's, which the avx2 and avx512 copies spell out with AVX2 intrinsics
// (adamw8bit_avx2.h; its table gathers are 8 lanes wide in both).
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

#include "optim/adamw_kernels.h"
#include "optim/adamw_scalar.h"

#ifdef __AVX2__
#include "optim/adamw8bit_avx2.h"
#endif

#ifndef LORAKIT_OPTIM_ISA
#error "define LORAKIT_OPTIM_ISA before including adamw_kernels_impl.h"
#endif

namespace lorakit::optim::LORAKIT_OPTIM_ISA {
namespace {

template <typename T>
void step_32bit(T* __restrict param, const T* __restrict grad, float* __restrict m,
                float* __restrict v, int64_t n, const AdamWScalars& s) {
  const AdamWScalars c = s;  // locals, so the compiler knows they do not alias the arrays
  for (int64_t i = 0; i < n; ++i) {
    Moments mv{m[i], v[i]};
    store(param + i, update(to_float(param[i]), to_float(grad[i]), mv, c));
    m[i] = mv.m;
    v[i] = mv.v;
  }
}

// One block of `len` <= kBlocksize elements: dequantize both moments, update them and the
// parameter in float32, then requantize with the block's new absolute maxima.
template <typename T>
void step_8bit_block(T* __restrict param, const T* __restrict grad, uint8_t* __restrict qm,
                     float* __restrict absmax_m, uint8_t* __restrict qv, float* __restrict absmax_v,
                     int64_t len, const CodeTables& mc, const CodeTables& vc,
                     const AdamWScalars& s) {
  const AdamWScalars c = s;
  float m[kBlocksize];
  float v[kBlocksize];
  const float old_m_scale = *absmax_m;
  const float old_v_scale = *absmax_v;
  uint32_t m_max = 0, v_max = 0;  // abs_bits maxima
  for (int64_t i = 0; i < len; ++i) {
    Moments mv{mc.code[qm[i]] * old_m_scale, vc.code[qv[i]] * old_v_scale};
    store(param + i, update(to_float(param[i]), to_float(grad[i]), mv, c));
    m[i] = mv.m;
    v[i] = mv.v;
    m_max = abs_bits(mv.m) > m_max ? abs_bits(mv.m) : m_max;
    v_max = abs_bits(mv.v) > v_max ? abs_bits(mv.v) : v_max;
  }
  float new_m_max, new_v_max;
  std::memcpy(&new_m_max, &m_max, sizeof m_max);
  std::memcpy(&new_v_max, &v_max, sizeof v_max);
  *absmax_m = new_m_max;
  *absmax_v = new_v_max;
  const float m_inverse = inverse_absmax(new_m_max);
  const float v_inverse = inverse_absmax(new_v_max);
  for (int64_t i = 0; i < len; ++i) {
    qm[i] = quantize(m[i] * m_inverse, mc);
    qv[i] = quantize(v[i] * v_inverse, vc);
  }
}

template <typename T>
void step_8bit(T* param, const T* grad, uint8_t* qm, float* absmax_m, uint8_t* qv, float* absmax_v,
               int64_t n, int64_t first_block, int64_t last_block, const CodeTables& mc,
               const CodeTables& vc, const AdamWScalars& s) {
  for (int64_t b = first_block; b < last_block; ++b) {
    const int64_t start = b * kBlocksize;
    const int64_t len = n - start < kBlocksize ? n - start : kBlocksize;
#ifdef __AVX2__
    if (len == kBlocksize && mc.exact && vc.exact) {
      step_8bit_full_block(param + start, grad + start, qm + start, absmax_m + b, qv + start,
                           absmax_v + b, mc, vc, s);
      continue;
    }
#endif
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
