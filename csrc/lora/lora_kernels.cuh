// The NF4 decode GEMV (1 to 16 rows): device code and launcher, free of torch and of the CUDA
// runtime so that nvcc (lora_cuda.cu) and the CPU emulation compile the same text. It reads the
// 4-bit codes directly (0.5625 bytes per weight with 64-value blocks; double-quantized scales
// decoded in the kernel too), never writing the expanded weight.
#pragma once

#include <cstdint>

#include "common/ceil_div.h"
#include "lora/nf4_scales.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {

constexpr int kMaxDecodeRows = 16;
constexpr int kWarpsPerBlock = 8;
constexpr int kValuesPerLane = 8;  // one 32-bit load of packed codes

// ---- device code ------------------------------------------------------------------------------

// The NF4 table for device code, initialised from the shared constexpr one (nf4_code.h); static, so
// each file that includes this header has its own.
static __constant__ float kDeviceCode[16] = {
    nf4::kCode[0],  nf4::kCode[1],  nf4::kCode[2],  nf4::kCode[3], nf4::kCode[4],  nf4::kCode[5],
    nf4::kCode[6],  nf4::kCode[7],  nf4::kCode[8],  nf4::kCode[9], nf4::kCode[10], nf4::kCode[11],
    nf4::kCode[12], nf4::kCode[13], nf4::kCode[14], nf4::kCode[15]};

template <typename scalar_t>
__device__ __forceinline__ void load8(const scalar_t* p, float* out) {
#pragma unroll
  for (int j = 0; j < kValuesPerLane; ++j) out[j] = static_cast<float>(p[j]);
}

// One warp per output row o: y[i, o] = sum_k x[i, k] W[o, k] (+ bias[o]) for i < m. Each lane
// takes 8 consecutive weights per step (one 32-bit load; in % 8 == 0 keeps it aligned and inside
// one block), so a warp reads 128 contiguous bytes of codes per step.
template <typename scalar_t>
__global__ void nf4_gemv_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int shift,
                                int64_t in, int64_t out, const scalar_t* __restrict__ x, int m,
                                const scalar_t* __restrict__ bias, scalar_t* __restrict__ y) {
  // Lanes index both tables with different codes: shared, not constant, memory.
  __shared__ float code[16];
  __shared__ float nested_code[256];
  if (threadIdx.x < 16) code[threadIdx.x] = kDeviceCode[threadIdx.x];
  if (scales.code) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = scales.code[i];
    scales.code = nested_code;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (o >= out) return;

  float acc[kMaxDecodeRows] = {};
  const int64_t row = o * in;
  for (int64_t k = lane * kValuesPerLane; k < in; k += 32 * kValuesPerLane) {
    const uint32_t codes = *reinterpret_cast<const uint32_t*>(packed + (row + k) / 2);
    const float scale = block_scale(scales, (row + k) >> shift);
    float w[kValuesPerLane];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // byte b (little-endian) holds elements 2b (high), 2b+1
      const uint32_t byte = (codes >> (8 * b)) & 0xFF;
      w[2 * b] = code[byte >> 4] * scale;
      w[2 * b + 1] = code[byte & 0x0F] * scale;
    }
#pragma unroll
    for (int i = 0; i < kMaxDecodeRows; ++i) {
      if (i < m) {
        float xv[kValuesPerLane];
        load8(x + i * in + k, xv);
#pragma unroll
        for (int j = 0; j < kValuesPerLane; ++j) acc[i] = fmaf(w[j], xv[j], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxDecodeRows; ++i) {
    if (i < m) {
      float sum = acc[i];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        sum += __shfl_xor_sync(0xFFFFFFFF, sum, offset);
      if (lane == 0) {
        if (bias) sum += static_cast<float>(bias[o]);
        y[i * out + o] = static_cast<scalar_t>(sum);
      }
    }
  }
}

// ---- launcher -----------------------------------------------------------------------------------
// Takes a launch policy: StreamLaunch under nvcc, emu::Launch under the CPU emulation.

template <typename Launch, typename scalar_t>
void launch_nf4_gemv(const Launch& launch, const uint8_t* packed, const BlockScales& scales,
                     int64_t blocksize, int64_t in, int64_t out, const scalar_t* x, int m,
                     const scalar_t* bias, scalar_t* y) {
  if (out == 0 || m == 0) return;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  launch("nf4_gemv_kernel", nf4_gemv_kernel<scalar_t>,
         dim3(static_cast<unsigned>(ceil_div(out, kWarpsPerBlock))), dim3(32 * kWarpsPerBlock),
         packed, scales, shift, in, out, x, m, bias, y);
}

}  // namespace lorakit::lora
