// AdamW steps (32-bit and blockwise 8-bit state): device code and launchers, free of torch and of
// the CUDA runtime so that nvcc (adamw_cuda.cu) and the CPU emulation compile the same text.
// The math is the CPU kernels' (adamw_kernels_impl.h), with explicit round-to-nearest intrinsics
// so that nvcc does not contract multiplies and adds into FMAs: both devices round alike.
#pragma once

#include <algorithm>
#include <cstdint>

#include "blockwise8/blockwise8_code.h"
#include "common/ceil_div.h"
#include "nf4/nf4_code.h"
#include "optim/adamw_kernels.h"

namespace lorakit::optim {

constexpr int kThreads = 256;
static_assert(kThreads == kBlocksize, "the 8-bit kernel gives one thread to each element");

// ---- device code ------------------------------------------------------------------------------

struct Moments {
  float m, v, update;
};

// One element of the step, in the order of adamw_kernels_impl.h; returns the new moments and
// the new parameter value (`update`).
__device__ __forceinline__ Moments adamw_element(float p, float g, float m, float v,
                                                 const AdamWScalars& s) {
  g = __fmul_rn(g, s.grad_scale);
  m = __fadd_rn(m, __fmul_rn(s.one_minus_b1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.one_minus_b2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  p = __fmul_rn(p, s.decay);
  return {m, v, __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom))};
}

template <typename T>
__global__ void adamw_kernel(T* __restrict__ param, const T* __restrict__ grad,
                             float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, int64_t n,
                             AdamWScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const Moments r = adamw_element(static_cast<float>(param[i]), static_cast<float>(grad[i]),
                                    exp_avg[i], exp_avg_sq[i], s);
    param[i] = static_cast<T>(r.update);
    exp_avg[i] = r.m;
    exp_avg_sq[i] = r.v;
  }
}

// NaN-keeping max over the thread block (blockwise8's rule: a NaN makes the absmax NaN).
__device__ inline float block_max(float x, float* warp_max) {
  for (int offset = 16; offset > 0; offset /= 2)
    x = nf4::nan_max(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = x;
  __syncthreads();
  float result = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) result = nf4::nan_max(result, warp_max[w]);
  __syncthreads();  // warp_max is reused by the next call
  return result;
}

// One thread block per quantization block of 256 elements.
template <typename T>
__global__ void adamw8bit_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                 uint8_t* __restrict__ qm, float* __restrict__ absmax_m,
                                 uint8_t* __restrict__ qv, float* __restrict__ absmax_v, int64_t n,
                                 const float* __restrict__ code_m, const float* __restrict__ code_v,
                                 AdamWScalars s) {
  __shared__ float codes[2][256];
  __shared__ float midpoints[2][256];
  __shared__ float warp_max[kThreads / 32];
  const int t = threadIdx.x;
  codes[0][t] = code_m[t];
  codes[1][t] = code_v[t];
  __syncthreads();
  if (t < 255) {
    midpoints[0][t] = (codes[0][t] + codes[0][t + 1]) / 2.0f;
    midpoints[1][t] = (codes[1][t] + codes[1][t + 1]) / 2.0f;
  }
  __syncthreads();

  const int64_t b = blockIdx.x;
  const int64_t i = b * kBlocksize + t;
  const bool live = i < n;
  Moments r{0.0f, 0.0f, 0.0f};
  if (live) {
    const float m = codes[0][qm[i]] * absmax_m[b];
    const float v = codes[1][qv[i]] * absmax_v[b];
    r = adamw_element(static_cast<float>(param[i]), static_cast<float>(grad[i]), m, v, s);
    param[i] = static_cast<T>(r.update);
  }
  const float m_max = block_max(fabsf(r.m), warp_max);  // dead lanes add 0, which changes nothing
  const float v_max = block_max(r.v, warp_max);
  if (live) {
    qm[i] = blockwise8::nearest_code(r.m * blockwise8::inverse_absmax(m_max), midpoints[0]);
    qv[i] = blockwise8::nearest_code(r.v * blockwise8::inverse_absmax(v_max), midpoints[1]);
  }
  if (t == 0) {
    absmax_m[b] = m_max;
    absmax_v[b] = v_max;
  }
}

// ---- launchers --------------------------------------------------------------------------------
// Each takes a launch policy: StreamLaunch under nvcc, emu::Launch under the CPU emulation.

template <typename Launch, typename T>
void launch_adamw(const Launch& launch, T* param, const T* grad, float* m, float* v, int64_t n,
                  const AdamWScalars& s) {
  constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loop covers the rest
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxBlocks));
  launch("adamw_kernel", adamw_kernel<T>, dim3(blocks), dim3(kThreads), param, grad, m, v, n, s);
}

template <typename Launch, typename T>
void launch_adamw8bit(const Launch& launch, T* param, const T* grad, uint8_t* qm, float* am,
                      uint8_t* qv, float* av, int64_t n, const float* code_m, const float* code_v,
                      const AdamWScalars& s) {
  const auto blocks = static_cast<unsigned>(ceil_div(n, kBlocksize));
  launch("adamw8bit_kernel", adamw8bit_kernel<T>, dim3(blocks), dim3(kThreads), param, grad, qm, am,
         qv, av, n, code_m, code_v, s);
}

}  // namespace lorakit::optim
