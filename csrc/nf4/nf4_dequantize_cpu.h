// Block-wise NF4 dequantization on the CPU, shared by the nf4_dequantize op and the LoRA linear,
// which expands one tile of weight rows at a time into a reused buffer.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cpu_isa.h"
#include "nf4/nf4_code.h"
#include "nf4/nf4_expand.h"

namespace lorakit::nf4 {

// Dequantizes block b (of a tensor of n values) with a scalar loop, into out[0, len).
template <typename scalar_t>
void dequantize_block_scalar(const uint8_t* packed, const float* absmax, int64_t n,
                             int64_t blocksize, int64_t b, scalar_t* out) {
  scalar_t table[16];
  block_table(absmax[b], table);
  const int64_t start = b * blocksize;
  const int64_t len = std::min(blocksize, n - start);
  const uint8_t* in = packed + start / 2;
  for (int64_t p = 0; p < len / 2; ++p) {
    out[2 * p] = table[in[p] >> 4];
    out[2 * p + 1] = table[in[p] & 0x0F];
  }
  if (len % 2) out[len - 1] = table[in[len / 2] >> 4];
}

// The vector expansion for the CPU's instruction-set level; null: the scalar loop.
inline ExpandNibbles expand_kernel() {
  return kernel_for_cpu_isa<ExpandNibbles>(nullptr, LORAKIT_X86_KERNEL(expand_nibbles_avx2),
                                           LORAKIT_X86_KERNEL(expand_nibbles_avx512));
}

// Dequantizes blocks [first, last) into out, which receives block `first` at out[0]. Full blocks
// go through `expand` (unless null), in chunks whose tables fit on the stack.
template <typename scalar_t>
void dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                       int64_t first, int64_t last, scalar_t* out, ExpandNibbles expand) {
  const int64_t origin = first;
  if (expand) {
    constexpr int64_t kChunk = 64;
    scalar_t tables[kChunk * 16];
    const int64_t vector_end = std::min(last, n / blocksize);
    for (int64_t b = first; b < vector_end; b += kChunk) {
      const int64_t count = std::min(kChunk, vector_end - b);
      for (int64_t k = 0; k < count; ++k) block_table(absmax[b + k], tables + 16 * k);
      expand(packed + b * blocksize / 2, blocksize / 2, count, tables, sizeof(scalar_t),
             out + (b - origin) * blocksize);
    }
    first = std::max(first, vector_end);
  }
  for (int64_t b = first; b < last; ++b)
    dequantize_block_scalar(packed, absmax, n, blocksize, b, out + (b - origin) * blocksize);
}

// Blocks per parallel task: enough work (~16K elements) to amortise the task.
inline int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

}  // namespace lorakit::nf4
