// Blockwise 8-bit quantize / dequantize: device code and launchers, free of torch and of the CUDA
// runtime so that nvcc (blockwise8_cuda.cu) and the CPU emulation compile the same text.
//
// quantize: a CTA owns whole quant blocks (grid-stride over them), builds the 255 code midpoints
// in shared memory once, reduces each block's absmax with a NaN-propagating max, then maps
// x * inverse_absmax(absmax) to the nearest code by binary search (nearest_code, shared with the
// CPU). dequantize: a CTA keeps the 256 codes in shared memory; each thread expands 16 bytes with
// code[q] * absmax in float32 and one conversion, like the CPU, through loads and 16-byte stores
// that are contiguous across a warp.
#pragma once

#include <algorithm>
#include <cstdint>

#include "blockwise8/blockwise8_code.h"
#include "common/ceil_div.h"
#include "common/cuda_vector.cuh"
#include "nf4/nf4_code.h"

namespace lorakit::blockwise8 {

// ---- device code ------------------------------------------------------------------------------

constexpr int kDequantThreads = 256;
constexpr int kDequantPerThread = 16;
// Grid sizing only: threads one SM holds on sm_80 and sm_90 (sm_86 / sm_89 hold 1536, which just
// means a second wave of CTAs there).
constexpr int kMaxThreadsPerSm = 2048;

// nan_max over the CTA; every thread gets the result. warp_max holds kThreads / 32 floats.
template <int kThreads>
__device__ float block_nan_max(float v, float* warp_max) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    v = nf4::nan_max(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_max[0];
#pragma unroll
  for (int k = 1; k < kThreads / 32; ++k) v = nf4::nan_max(v, warp_max[k]);
  __syncthreads();  // warp_max is written again for the next block
  return v;
}

// kThreads = min(blocksize, 256) threads; each visits its block with stride kThreads, so loads
// are coalesced; the second pass re-reads the block from L1/L2.
template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads)
    blockwise8_quantize_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t blocksize,
                               int64_t num_blocks, const float* __restrict__ code,
                               uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float midpoints[kCodeSize - 1];
  __shared__ float warp_max[kThreads / 32];
  for (int i = threadIdx.x; i + 1 < kCodeSize; i += kThreads)
    midpoints[i] = (code[i] + code[i + 1]) / 2.0f;
  __syncthreads();

  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const scalar_t* xb = x + start;
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += kThreads)
      amax = nf4::nan_max(amax, fabsf(static_cast<float>(xb[i])));
    amax = block_nan_max<kThreads>(amax, warp_max);
    if (threadIdx.x == 0) absmax[b] = amax;
    const float inverse = inverse_absmax(amax);
    for (int64_t i = threadIdx.x; i < len; i += kThreads)
      q[start + i] = nearest_code(static_cast<float>(xb[i]) * inverse, midpoints);
  }
}

// Byte i of a packed word of codes.
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int i) { return (w >> (8 * i)) & 0xFF; }
__device__ __forceinline__ uint32_t byte_of(uint2 w, int i) {
  return byte_of(i < 4 ? w.x : w.y, i % 4);
}

// Grid-stride over tiles of kDequantThreads * 16 values. Thread t expands its 16 values as chunks
// of kVec at tile + c * kDequantThreads * kVec + t * kVec (c = 0, 1, ...), so each load and each
// 16-byte store instruction of a warp touches contiguous memory. blocksize >= 64 > kVec, so a
// chunk has a single absmax.
template <typename scalar_t>
__global__ void __launch_bounds__(kDequantThreads)
    blockwise8_dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                 const float* __restrict__ code, int64_t n, int log2_blocksize,
                                 bool vector_ok, scalar_t* __restrict__ out) {
  constexpr int kVec = values_per_16_bytes<scalar_t>();
  constexpr int kChunks = kDequantPerThread / kVec;
  constexpr int kChunkStride = kDequantThreads * kVec;
  constexpr int64_t kTile = int64_t{kDequantThreads} * kDequantPerThread;
  using Word = typename UnsignedWord<kVec>::type;

  __shared__ float values[kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize; i += kDequantThreads) values[i] = code[i];
  __syncthreads();

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTile; tile < n;
       tile += static_cast<int64_t>(gridDim.x) * kTile) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kVec;
    if (vector_ok && n - tile >= kTile) {
      Word words[kChunks];
      float scales[kChunks];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {  // all loads first, so they are in flight together
        const int64_t e = first + c * kChunkStride;
        words[c] = *reinterpret_cast<const Word*>(q + e);
        scales[c] = absmax[e >> log2_blocksize];
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        Vec<scalar_t, kVec> v;
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          v.v[i] = static_cast<scalar_t>(values[byte_of(words[c], i)] * scales[c]);
        *reinterpret_cast<Vec<scalar_t, kVec>*>(out + first + c * kChunkStride) = v;
      }
    } else {  // the last, partial tile, or q off its word alignment
      for (int c = 0; c < kChunks; ++c) {
        const int64_t e = first + c * kChunkStride;
        if (e >= n) break;
        const float scale = absmax[e >> log2_blocksize];
        const int64_t count = std::min<int64_t>(kVec, n - e);
        for (int64_t i = 0; i < count; ++i)
          out[e + i] = static_cast<scalar_t>(values[q[e + i]] * scale);
      }
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------
// Each takes a launch policy (StreamLaunch under nvcc, emu::Launch under the CPU emulation) and the
// device's SM count, which sizes the grid-stride grids.

template <int kThreads, typename Launch, typename scalar_t>
void launch_quantize_threads(const Launch& launch, int sm_count, const scalar_t* x, int64_t n,
                             int64_t blocksize, const float* code, uint8_t* q, float* absmax) {
  const int64_t num_blocks = ceil_div(n, blocksize);
  // Enough CTAs to fill every SM; each loops over its share of the quant blocks.
  const int64_t grid =
      std::min<int64_t>(num_blocks, int64_t{sm_count} * (kMaxThreadsPerSm / kThreads));
  launch("blockwise8_quantize_kernel", blockwise8_quantize_kernel<scalar_t, kThreads>,
         dim3(static_cast<unsigned>(grid)), dim3(kThreads), x, n, blocksize, num_blocks, code, q,
         absmax);
}

template <typename Launch, typename scalar_t>
void launch_quantize(const Launch& launch, int sm_count, const scalar_t* x, int64_t n,
                     int64_t blocksize, const float* code, uint8_t* q, float* absmax) {
  if (blocksize == 64) {
    launch_quantize_threads<64>(launch, sm_count, x, n, blocksize, code, q, absmax);
  } else if (blocksize == 128) {
    launch_quantize_threads<128>(launch, sm_count, x, n, blocksize, code, q, absmax);
  } else {
    launch_quantize_threads<256>(launch, sm_count, x, n, blocksize, code, q, absmax);
  }
}

template <typename Launch, typename scalar_t>
void launch_dequantize(const Launch& launch, int sm_count, const uint8_t* q, const float* absmax,
                       const float* code, int64_t n, int64_t blocksize, scalar_t* out) {
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  const int64_t needed = ceil_div(n, int64_t{kDequantThreads} * kDequantPerThread);
  const int64_t grid =
      std::min<int64_t>(needed, int64_t{sm_count} * (kMaxThreadsPerSm / kDequantThreads));
  const bool vector_ok = reinterpret_cast<uintptr_t>(q) % values_per_16_bytes<scalar_t>() == 0;
  launch("blockwise8_dequantize_kernel", blockwise8_dequantize_kernel<scalar_t>,
         dim3(static_cast<unsigned>(grid)), dim3(kDequantThreads), q, absmax, code, n,
         log2_blocksize, vector_ok, out);
}

}  // namespace lorakit::blockwise8
