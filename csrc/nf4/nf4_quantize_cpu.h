// Block-wise NF4 quantization on the CPU, shared by the nf4_quantize op and the NF4 LoRA merge,
// which quantizes each updated block straight from a float32 buffer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "nf4/nf4_code.h"

namespace lorakit::nf4 {

// Quantizes one block x[0, len) (len == blocksize, or less for the last block) into out (the
// block's first byte) and *absmax. bitsandbytes multiplies full blocks by the float32 reciprocal
// of their absmax but divides a last, partial block by its absmax clamped to 1e-38 (and stores
// the clamped value); both are reproduced so the bytes match.
template <typename scalar_t>
void quantize_block(const scalar_t* x, int64_t len, int64_t blocksize, uint8_t* out,
                    float* absmax) {
  float scaled[4096];                   // the largest supported blocksize
  const uint8_t pad = nf4_index(0.0f);  // an odd element count is padded with a scaled zero
  float amax = 0.0f;
  for (int64_t i = 0; i < len; ++i) amax = nan_max(amax, std::abs(static_cast<float>(x[i])));

  if (len == blocksize) {
    *absmax = amax;
    const float inv = 1.0f / std::max(amax, kMinPartialAbsmax);  // std::max keeps a NaN amax
    for (int64_t i = 0; i < len; ++i) scaled[i] = static_cast<float>(x[i]) * inv;
  } else {
    const float clamped = std::max(amax, kMinPartialAbsmax);
    *absmax = clamped;
    for (int64_t i = 0; i < len; ++i) scaled[i] = static_cast<float>(x[i]) / clamped;
  }

  const int64_t pairs = len / 2;
  for (int64_t p = 0; p < pairs; ++p)
    out[p] = static_cast<uint8_t>(nf4_index(scaled[2 * p]) << 4 | nf4_index(scaled[2 * p + 1]));
  if (len % 2) out[pairs] = static_cast<uint8_t>(nf4_index(scaled[len - 1]) << 4 | pad);
}

}  // namespace lorakit::nf4
