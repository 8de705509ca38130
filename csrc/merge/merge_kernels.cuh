// The dense LoRA merge W += s * B A: device code and launcher, free of torch and of the CUDA
// runtime so that nvcc (merge_cuda.cu) and the CPU emulation compile the same text.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/ceil_div.h"

namespace lorakit::merge {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// ---- device code ------------------------------------------------------------------------------

// Grid-stride over rows (y) and columns (x): w[i, j] += scale * sum_k b[i, k] a[k, j] in float32,
// rounded once. A warp reads 32 consecutive columns of each row of A (coalesced); b[i, k] is the
// same for the whole warp (a broadcast).
template <typename scalar_t>
__global__ void lora_merge_kernel(scalar_t* __restrict__ w, const float* __restrict__ a,
                                  const float* __restrict__ b, int64_t out, int64_t in, int64_t r,
                                  float scale) {
  for (int64_t i = blockIdx.y; i < out; i += gridDim.y) {
    for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < in;
         j += int64_t{gridDim.x} * blockDim.x) {
      float acc = 0.0f;
      for (int64_t k = 0; k < r; ++k) acc += b[i * r + k] * a[k * in + j];
      scalar_t& x = w[i * in + j];
      x = static_cast<scalar_t>(static_cast<float>(x) + scale * acc);
    }
  }
}

// ---- launcher -----------------------------------------------------------------------------------
// Takes a launch policy: StreamLaunch under nvcc, emu::Launch under the CPU emulation.

template <typename Launch, typename scalar_t>
void launch_merge(const Launch& launch, scalar_t* w, const float* a, const float* b, int64_t out,
                  int64_t in, int64_t r, float scale) {
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(in, kThreads), 1024)),
                  static_cast<unsigned>(std::min(out, kMaxGridY)));
  launch("lora_merge_kernel", lora_merge_kernel<scalar_t>, grid, dim3(kThreads), w, a, b, out, in,
         r, scale);
}

}  // namespace lorakit::merge
