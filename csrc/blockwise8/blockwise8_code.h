// The sorted 256-value code: its size, the smallest scale, and the nearest entry; shared by the
// CPU and CUDA kernels (torch-free).
#pragma once

#include <cstdint>

#include "nf4/nf4_code.h"  // LORAKIT_HOST_DEVICE

namespace lorakit::blockwise8 {

constexpr int64_t kCodeSize = 256;
// Zero blocks are scaled by this instead of 0, so they map to the code nearest 0, not to NaN.
constexpr float kMinAbsmax = 1e-38f;

// A block's values are multiplied by this before nearest_code: 1 / absmax rounded once to float32
// (bitsandbytes' rule: its CUDA kernels and PyTorch reference multiply by the reciprocal rather
// than divide). A NaN absmax gives NaN, which sends the whole block to code 255.
LORAKIT_HOST_DEVICE float inverse_absmax(float absmax) {
  return 1.0f / (absmax < kMinAbsmax ? kMinAbsmax : absmax);
}

// midpoints[i] = (code[i] + code[i+1]) / 2 in float32. Returns the first i with x <= midpoints[i]
// (255 if none): the nearest code, ties to the lower one, NaN to 255 — the same rule as
// torch.bucketize against the midpoints, which bitsandbytes' reference implementation uses.
LORAKIT_HOST_DEVICE uint8_t nearest_code(float x, const float* midpoints) {
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (x <= midpoints[mid]) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return static_cast<uint8_t>(lo);
}

}  // namespace lorakit::blockwise8
