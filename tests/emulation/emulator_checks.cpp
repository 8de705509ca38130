// Kernels that check the emulator itself: small correct kernels, the same kernels each with one
// classic bug (run by tests/test_cuda_emulation.py, which asserts that each bug is caught), and
// the half / bfloat16 conversions (compared with torch's).
#include <cstring>
#include <string>

#include "emulated_api.h"

namespace {

using lorakit::emu::KernelError;
using lorakit::emu::Launch;

constexpr int kThreads = 256;

// y[w] = sum of the 32 values of warp w.
__global__ void warp_sum(const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  if (threadIdx.x % 32 == 0) y[i / 32] = v;
}

// y[i] = x[warp's lane 0] + ... + x[i]: an inclusive scan with __shfl_up_sync.
__global__ void warp_scan(const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  float v = x[i];
  for (int offset = 1; offset < 32; offset *= 2) {
    const float up = __shfl_up_sync(0xFFFFFFFFu, v, offset);
    if (lane >= offset) v += up;
  }
  y[i] = v;
}

// In groups of 8 lanes (width 8): y[i] = x[group's lane 3] (__shfl_sync), plus, on each group's
// first lane, 1000 times the group's sum (__shfl_down_sync).
__global__ void group8_broadcast_and_sum(const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float sum = x[i];
  for (int offset = 4; offset > 0; offset /= 2)
    sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset, 8);
  const float third = __shfl_sync(0xFFFFFFFFu, x[i], 3, 8);
  y[i] = third + (threadIdx.x % 8 == 0 ? 1000.0f * sum : 0.0f);
}

// Bug: the butterfly starts at 32, a lane outside the warp, so every step is off by one level.
__global__ void warp_sum_wrong_offset(const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int offset = 32; offset > 1; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  if (threadIdx.x % 32 == 0) y[i / 32] = v;
}

// Bug: the mask names only the low half-warp, but every lane shuffles.
__global__ void warp_sum_wrong_mask(const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0x0000FFFFu, v, offset);
  if (threadIdx.x % 32 == 0) y[i / 32] = v;
}

// y = x with each block's kThreads values reversed, through shared memory.
__global__ void block_reverse(const float* x, float* y) {
  __shared__ float tile[kThreads];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = x[i];
  __syncthreads();
  y[i] = tile[kThreads - 1 - threadIdx.x];
}

// Bug: no barrier between the writes to shared memory and the reads of other threads' values.
__global__ void block_reverse_missing_barrier(const float* x, float* y) {
  __shared__ float tile[kThreads];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = x[i];
  y[i] = tile[kThreads - 1 - threadIdx.x];
}

// Bug: the first barrier sits inside a branch that only the first warp takes, so that warp waits
// there while the others go on to the second one.
__global__ void block_reverse_divergent_barrier(const float* x, float* y) {
  __shared__ float tile[kThreads];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = x[i];
  if (threadIdx.x < 32) __syncthreads();
  y[i] = tile[kThreads - 1 - threadIdx.x];
  __syncthreads();
}

// Odd threads return at once; the others count themselves twice around a barrier, which must not
// wait for the returned threads (they count as arrived). y[0] ends at 2 * (threads / 2).
__global__ void count_after_early_return(const float* /*x*/, float* y) {
  if (threadIdx.x % 2) return;
  atomicAdd(y, 1.0f);
  __syncthreads();
  atomicAdd(y, 1.0f);
}

using Kernel = void (*)(const float*, float*);
struct Named {
  const char* name;
  Kernel kernel;
};
constexpr Named kKernels[] = {
    {"warp_sum", warp_sum},
    {"warp_scan", warp_scan},
    {"group8_broadcast_and_sum", group8_broadcast_and_sum},
    {"warp_sum_wrong_offset", warp_sum_wrong_offset},
    {"warp_sum_wrong_mask", warp_sum_wrong_mask},
    {"block_reverse", block_reverse},
    {"block_reverse_missing_barrier", block_reverse_missing_barrier},
    {"block_reverse_divergent_barrier", block_reverse_divergent_barrier},
    {"count_after_early_return", count_after_early_return},
};

}  // namespace

// Runs kernel `name` on `blocks` blocks of `threads` threads.
LORAKIT_EMU_API int emu_check_kernel(const char* name, int blocks, int threads, const float* x,
                                     float* y, char* error, size_t size) {
  return lorakit::emu::guarded(error, size, [&] {
    for (const Named& k : kKernels)
      if (std::strcmp(k.name, name) == 0)
        return Launch{}(k.name, k.kernel, dim3(blocks), dim3(threads), x, y);
    throw KernelError(std::string("no check kernel named ") + name);
  });
}

LORAKIT_EMU_API void emu_float2half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half(in[i]).bits;
}
LORAKIT_EMU_API void emu_half2float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
LORAKIT_EMU_API void emu_float2bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16(in[i]).bits;
}
LORAKIT_EMU_API void emu_bfloat162float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}
