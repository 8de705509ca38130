// The row kernel of fused linear cross-entropy on CUDA: device code and launcher, free of torch
// and of the CUDA runtime so that nvcc (fused_ce_cuda.cu) and the CPU emulation compile the same
// text. The same contract as the CPU rows (fused_ce_rows_impl.h): per row z of logits (soft-capped
// first when softcap > 0), label y, k = scale * row_scale,
//   logprob = z_y - lse,  lse = log sum_v exp(z_v)
//   z_v <- k (exp(z_v - lse) - [v = y]) (1 - (z_v / c)^2 with softcap)   when write_grad.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_ce/fused_ce_rows.h"

namespace lorakit::fused_ce {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// ---- device code ------------------------------------------------------------------------------

__device__ __forceinline__ float capped(float z, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// (m, s) with s = sum exp(z - m) absorbs another such pair. m = -inf marks an empty pair.
__device__ __forceinline__ void absorb(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float hi = fmaxf(m, m2);
  s = s * expf(m - hi) + s2 * expf(m2 - hi);
  m = hi;
}

// One block per row. Each thread keeps an online maximum and sum of exponentials over its
// strided share of the row (one read of the row), the block combines them through warp shuffles
// and shared memory; a second read of the row writes the gradient in place. `bad` = sum 0 * z is
// NaN exactly when some z is not finite (the maximum alone would drop a NaN).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_ce_rows_kernel(scalar_t* __restrict__ logits, int64_t vocab,
                         const int64_t* __restrict__ labels, const float* __restrict__ row_scale,
                         float scale, float softcap, bool write_grad,
                         float* __restrict__ logprobs) {
  __shared__ float warp_m[kWarps];
  __shared__ float warp_s[kWarps];
  __shared__ float warp_bad[kWarps];
  __shared__ float row_lse;
  const int64_t row = blockIdx.x;
  scalar_t* z = logits + row * vocab;
  const int64_t y = labels[row];
  const bool ignored = y == kIgnoreIndex;

  float m = -INFINITY, s = 0.0f, bad = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float v = capped(static_cast<float>(z[j]), softcap);
    bad += v * 0.0f;
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFF, m, offset);
    const float s2 = __shfl_xor_sync(0xFFFFFFFF, s, offset);
    bad += __shfl_xor_sync(0xFFFFFFFF, bad, offset);
    absorb(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
    warp_bad[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? warp_m[lane] : -INFINITY;
    s = lane < kWarps ? warp_s[lane] : 0.0f;
    bad = lane < kWarps ? warp_bad[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
      const float m2 = __shfl_xor_sync(0xFFFFFFFF, m, offset);
      const float s2 = __shfl_xor_sync(0xFFFFFFFF, s, offset);
      bad += __shfl_xor_sync(0xFFFFFFFF, bad, offset);
      absorb(m, s, m2, s2);
    }
    if (lane == 0) {
      const float lse = m + logf(s) + bad;
      row_lse = lse;
      // Read before the barrier below: after it, the gradient overwrites z[y].
      logprobs[row] = ignored ? 0.0f : capped(static_cast<float>(z[y]), softcap) - lse;
    }
  }
  __syncthreads();
  if (!write_grad) return;
  const float lse = row_lse;
  const float k = ignored ? 0.0f : scale * (row_scale ? row_scale[row] : 1.0f);
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    if (k == 0.0f) {
      z[j] = static_cast<scalar_t>(0.0f);
      continue;
    }
    const float v = capped(static_cast<float>(z[j]), softcap);
    float g = k * (expf(v - lse) - (j == y ? 1.0f : 0.0f));
    if (softcap > 0.0f) g *= 1.0f - (v / softcap) * (v / softcap);
    z[j] = static_cast<scalar_t>(g);
  }
}

// ---- launcher -----------------------------------------------------------------------------------
// Takes a launch policy: StreamLaunch under nvcc, emu::Launch under the CPU emulation.

template <typename Launch, typename scalar_t>
void launch_fused_ce_rows(const Launch& launch, scalar_t* logits, int64_t rows, int64_t vocab,
                          const int64_t* labels, const float* row_scale, float scale, float softcap,
                          bool write_grad, float* logprobs) {
  if (rows == 0) return;
  launch("fused_ce_rows_kernel", fused_ce_rows_kernel<scalar_t>, dim3(static_cast<unsigned>(rows)),
         dim3(kThreads), logits, vocab, labels, row_scale, scale, softcap, write_grad, logprobs);
}

}  // namespace lorakit::fused_ce
