// NF4 quantize / dequantize: device code and launchers, free of torch and of the CUDA runtime so
// that nvcc (nf4_cuda.cu) and the CPU emulation (tests/emulation) compile the same text.
//
// Both kernels are memory bound; they are written so that the arithmetic per element stays well
// under what an H100 can issue while streaming at full bandwidth:
//  - quantize: one thread owns 8 consecutive values (one or two 16-byte loads), BS/8 threads own a
//    quant block and reduce its absmax with warp shuffles (plus shared memory above 256). The
//    nearest code is found with a 33-cell lookup and one comparison instead of 15 comparisons.
//  - dequantize: one thread expands 8 packed bytes into 16 values, written with 16-byte stores
//    laid out so that every load and store instruction of a warp touches contiguous memory.
// Float arithmetic is the CPU's: x * (1 / absmax) for full blocks, x / absmax for the last partial
// block, code * absmax then one round-to-nearest-even conversion. No fast-math intrinsics.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/ceil_div.h"
#include "common/cuda_vector.cuh"
#include "nf4/nf4_code.h"

namespace lorakit::nf4 {

// ---- nearest code by cell lookup ------------------------------------------------------------
//
// nf4_index(s) counts the midpoints m_i with s > m_i (NaN counts all 15). Cut [-1, 1] into the 33
// cells c(s) = round(16 s) + 16; c is monotone in s, so every midpoint in a lower cell is < s and
// every midpoint in a higher cell is > s. Neighbouring midpoints are at least 0.08 apart (from
// 0.0398 to 0.1203) and a cell is 1/16 = 0.0625 wide, so a cell holds at most one midpoint:
//   nf4_index(s) = base[c] + (s > mid[c]),
// base[c] = the number of midpoints in cells below c, mid[c] = the midpoint in c (+inf if none).
// Clamping s to [-1, 1] first changes no comparison (all midpoints are inside (-0.85, 0.87)) and
// sends NaN to 1 (fminf returns the other operand), which lands in bucket 15 as nf4_index does.
// The table is built on the host with the same cell function. When this was written,
// nf4_index_lookup was compared with nf4_index on the host for all 2^32 float bit patterns: equal
// for all but signalling NaNs, which x86's fminf turns into NaN rather than ignoring. s is always
// the result of a multiply or a divide, which never produces a signalling NaN.

constexpr int kCellCount = 33;
constexpr float kCellsPerUnit = 16.0f;
// 1.5 * 2^23: adding it to |v| <= 2^22 rounds v to an integer (round to nearest even) held in the
// low mantissa bits, so bits(v + kRoundMagic) - bits(kRoundMagic) = rint(v).
constexpr float kRoundMagic = 12582912.0f;
constexpr uint32_t kRoundMagicBits = 0x4B400000u;

// 8-byte aligned so a lookup is one 64-bit shared-memory load.
struct alignas(8) CellEntry {
  float mid;  // the midpoint inside the cell, or +inf
  int base;   // midpoints in lower cells
};

struct CellTable {
  CellEntry cell[kCellCount];
};

// Both branches give the same bits; the host one also builds the cell table (make_cell_table)
// and runs under the CPU emulation.
LORAKIT_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

LORAKIT_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Clamps s to [-1, 1], NaN to 1.
LORAKIT_HOST_DEVICE float clamp_unit(float s) { return fmaxf(fminf(s, 1.0f), -1.0f); }

// The cell of a clamped value: 16 * s is exact, so the one rounding is the magic add.
LORAKIT_HOST_DEVICE int cell_of(float clamped) {
  return static_cast<int>(float_bits(clamped * kCellsPerUnit + kRoundMagic) - kRoundMagicBits) + 16;
}

LORAKIT_HOST_DEVICE uint32_t nf4_index_lookup(float s, const CellEntry* table) {
  const float c = clamp_unit(s);
  const CellEntry e = table[cell_of(c)];
  return static_cast<uint32_t>(e.base) + (c > e.mid ? 1u : 0u);
}

inline CellTable make_cell_table() {
  CellTable t;
  for (int j = 0; j < kCellCount; ++j) t.cell[j] = {bits_float(0x7F800000u), 0};
  for (int i = 0; i < 15; ++i) {
    const int c = cell_of(midpoint(i));
    if (float_bits(t.cell[c].mid) != 0x7F800000u)
      throw std::logic_error("nf4: two midpoints in one lookup cell");
    t.cell[c].mid = midpoint(i);
    for (int j = c + 1; j < kCellCount; ++j) ++t.cell[j].base;
  }
  return t;
}

inline const CellTable& cell_table() {
  static const CellTable table = make_cell_table();
  return table;
}

struct CodeTable {
  float v[16];
};

inline CodeTable code_table() {
  CodeTable t;
  for (int j = 0; j < 16; ++j) t.v[j] = kCode[j];
  return t;
}

// ---- device code ------------------------------------------------------------------------------

constexpr int kQuantPerThread = 8;     // values per thread in quantize
constexpr int kDequantPerThread = 16;  // values per thread in dequantize
constexpr int kDequantThreads = 256;

// Threads per quantize CTA: at least 256, and whole quant blocks (BS / 8 threads each).
constexpr int quant_threads(int blocksize) {
  return blocksize / kQuantPerThread > 256 ? blocksize / kQuantPerThread : 256;
}

// Each thread quantizes values [e0, e0 + 8) of the flattened input (n values). The BS / 8
// threads of a quant block are consecutive and aligned, so a group never straddles a warp
// boundary when BS <= 256 and spans whole warps above.
template <typename scalar_t, int kBlocksize>
__global__ void __launch_bounds__(quant_threads(kBlocksize))
    nf4_quantize_kernel(const scalar_t* __restrict__ w, int64_t n, bool vector_ok, CellTable cells,
                        uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  constexpr int kGroup = kBlocksize / kQuantPerThread;  // threads per quant block
  constexpr int kThreads = quant_threads(kBlocksize);
  __shared__ CellEntry table[kCellCount];

  const int tid = threadIdx.x;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kThreads + tid) * kQuantPerThread;
  const int64_t valid = n - e0;  // <= 0 for threads past the end; they still join the reduction

  float x[kQuantPerThread];
  if (vector_ok && valid >= kQuantPerThread) {
    const Vec<scalar_t, kQuantPerThread> v =
        *reinterpret_cast<const Vec<scalar_t, kQuantPerThread>*>(w + e0);
#pragma unroll
    for (int i = 0; i < kQuantPerThread; ++i) x[i] = static_cast<float>(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kQuantPerThread; ++i)
      x[i] = i < valid ? static_cast<float>(w[e0 + i]) : 0.0f;
  }
  if (tid < kCellCount) table[tid] = cells.cell[tid];

  // |x| as bits: for non-negative floats unsigned order is float order, and every NaN is above
  // +inf, so an unsigned max propagates NaN like nan_max does.
  uint32_t amax_bits = 0;
#pragma unroll
  for (int i = 0; i < kQuantPerThread; ++i)
    amax_bits = max(amax_bits, float_bits(x[i]) & 0x7FFFFFFFu);
  constexpr int kWarpSpan = kGroup < 32 ? kGroup : 32;
#pragma unroll
  for (int offset = kWarpSpan / 2; offset > 0; offset /= 2)
    amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, offset));
  if constexpr (kGroup > 32) {
    constexpr int kWarpsPerGroup = kGroup / 32;
    __shared__ uint32_t warp_max[kThreads / 32];
    const int warp = tid / 32;
    if (tid % 32 == 0) warp_max[warp] = amax_bits;
    __syncthreads();
    const int first = warp / kWarpsPerGroup * kWarpsPerGroup;
#pragma unroll
    for (int k = 0; k < kWarpsPerGroup; ++k) amax_bits = max(amax_bits, warp_max[first + k]);
  } else {
    __syncthreads();  // the cell table
  }
  if (valid <= 0) return;

  const float amax = bits_float(amax_bits);
  const int64_t block = e0 / kBlocksize;
  const bool full = (block + 1) * kBlocksize <= n;
  // std::max(amax, kMinPartialAbsmax) as the CPU writes it: (a < b) ? b : a keeps a NaN amax.
  const float clamped = amax < kMinPartialAbsmax ? kMinPartialAbsmax : amax;
  if (e0 % kBlocksize == 0) absmax[block] = full ? amax : clamped;

  uint32_t idx[kQuantPerThread];
  if (full) {
    const float inv = 1.0f / clamped;
#pragma unroll
    for (int i = 0; i < kQuantPerThread; ++i) idx[i] = nf4_index_lookup(x[i] * inv, table);
  } else {
#pragma unroll
    for (int i = 0; i < kQuantPerThread; ++i) idx[i] = nf4_index_lookup(x[i] / clamped, table);
  }

  if (valid >= kQuantPerThread) {
    // Byte p holds value 2p in its high nibble; bytes are little-endian in the word.
    uint32_t word = 0;
#pragma unroll
    for (int p = 0; p < kQuantPerThread / 2; ++p)
      word |= (idx[2 * p] << 4 | idx[2 * p + 1]) << (8 * p);
    *reinterpret_cast<uint32_t*>(packed + e0 / 2) = word;  // e0 / 2 is a multiple of 4
  } else {
    const uint32_t pad = nf4_index(0.0f);  // an odd count pads the last low nibble
#pragma unroll
    for (int p = 0; p < kQuantPerThread / 2; ++p) {
      if (2 * p >= valid) break;
      const uint32_t lo = 2 * p + 1 < valid ? idx[2 * p + 1] : pad;
      packed[e0 / 2 + p] = static_cast<uint8_t>(idx[2 * p] << 4 | lo);
    }
  }
}

// A CTA expands a tile of kDequantThreads * 16 values. Thread t writes its 16 values as chunks of
// kVec at tile + c * kDequantThreads * kVec + t * kVec (c = 0, 1, ...), so each store instruction
// of a warp covers 512 contiguous bytes and each load of the chunk's kVec / 2 packed bytes is
// contiguous across the warp too. blocksize >= 32 > kVec, so a chunk has a single absmax.
template <typename scalar_t>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                          int64_t n, int log2_blocksize, bool vector_ok, CodeTable codes,
                          scalar_t* __restrict__ out) {
  constexpr int kVec = values_per_16_bytes<scalar_t>();
  constexpr int kChunks = kDequantPerThread / kVec;
  constexpr int kChunkStride = kDequantThreads * kVec;
  constexpr int64_t kTile = int64_t{kDequantThreads} * kDequantPerThread;
  using Word = typename UnsignedWord<kVec / 2>::type;

  __shared__ float code[16];
  const int tid = threadIdx.x;
  if (tid < 16) {  // constant indices only, so the table stays in the parameter space
    float v = codes.v[0];
#pragma unroll
    for (int j = 1; j < 16; ++j) v = tid == j ? codes.v[j] : v;
    code[tid] = v;
  }
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t first = tile + static_cast<int64_t>(tid) * kVec;
  if (vector_ok && n - tile >= kTile) {
    uint32_t words[kChunks];
    float scales[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // all loads first, so they are in flight together
      const int64_t e = first + c * kChunkStride;
      words[c] = *reinterpret_cast<const Word*>(packed + e / 2);
      scales[c] = absmax[e >> log2_blocksize];
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      Vec<scalar_t, kVec> v;
#pragma unroll
      for (int p = 0; p < kVec / 2; ++p) {
        const uint32_t byte = words[c] >> (8 * p);  // little-endian: byte p of the chunk
        v.v[2 * p] = static_cast<scalar_t>(code[(byte >> 4) & 0x0F] * scales[c]);
        v.v[2 * p + 1] = static_cast<scalar_t>(code[byte & 0x0F] * scales[c]);
      }
      *reinterpret_cast<Vec<scalar_t, kVec>*>(out + first + c * kChunkStride) = v;
    }
  } else {  // the last, partial tile, or packed off its word alignment
    for (int c = 0; c < kChunks; ++c) {
      const int64_t e = first + c * kChunkStride;
      if (e >= n) break;
      const float scale = absmax[e >> log2_blocksize];
      const int64_t count = n - e < kVec ? n - e : kVec;
      for (int64_t i = 0; i < count; ++i) {
        const uint32_t byte = packed[(e + i) / 2];
        const uint32_t nibble = (e + i) % 2 ? byte & 0x0F : byte >> 4;
        out[e + i] = static_cast<scalar_t>(code[nibble] * scale);
      }
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------
// Each takes a launch policy: StreamLaunch (common/cuda_launch.cuh) under nvcc, emu::Launch under
// the CPU emulation.

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline unsigned grid_for(int64_t blocks, const char* op, int64_t n) {
  if (blocks > INT_MAX)
    throw std::length_error(std::string(op) + ": " + std::to_string(n) +
                            " values is too many for one launch");
  return static_cast<unsigned>(blocks);
}

template <int kBlocksize, typename Launch, typename scalar_t>
void launch_quantize_bs(const Launch& launch, const scalar_t* w, int64_t n, uint8_t* packed,
                        float* absmax) {
  constexpr int kThreads = quant_threads(kBlocksize);
  const int64_t blocks = ceil_div(n, int64_t{kThreads} * kQuantPerThread);
  launch("nf4_quantize_kernel", nf4_quantize_kernel<scalar_t, kBlocksize>,
         dim3(grid_for(blocks, "nf4_quantize", n)), dim3(kThreads), w, n, aligned_to(w, 16),
         cell_table(), packed, absmax);
}

template <typename Launch, typename scalar_t>
void launch_quantize(const Launch& launch, const scalar_t* w, int64_t n, int64_t blocksize,
                     uint8_t* packed, float* absmax) {
  switch (blocksize) {
    case 32:
      return launch_quantize_bs<32>(launch, w, n, packed, absmax);
    case 64:
      return launch_quantize_bs<64>(launch, w, n, packed, absmax);
    case 128:
      return launch_quantize_bs<128>(launch, w, n, packed, absmax);
    case 256:
      return launch_quantize_bs<256>(launch, w, n, packed, absmax);
    case 512:
      return launch_quantize_bs<512>(launch, w, n, packed, absmax);
    case 1024:
      return launch_quantize_bs<1024>(launch, w, n, packed, absmax);
    case 2048:
      return launch_quantize_bs<2048>(launch, w, n, packed, absmax);
    case 4096:
      return launch_quantize_bs<4096>(launch, w, n, packed, absmax);
    default:
      throw std::invalid_argument("nf4_quantize: unsupported blocksize " +
                                  std::to_string(blocksize));
  }
}

template <typename Launch, typename scalar_t>
void launch_dequantize(const Launch& launch, const uint8_t* packed, const float* absmax, int64_t n,
                       int64_t blocksize, scalar_t* out) {
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  const int64_t blocks = ceil_div(n, int64_t{kDequantThreads} * kDequantPerThread);
  launch("nf4_dequantize_kernel", nf4_dequantize_kernel<scalar_t>,
         dim3(grid_for(blocks, "nf4_dequantize", n)), dim3(kDequantThreads), packed, absmax, n,
         log2_blocksize, aligned_to(packed, values_per_16_bytes<scalar_t>() / 2), code_table(),
         out);
}

}  // namespace lorakit::nf4
