// Argument checks and the nearest-code rule for the blockwise 8-bit ops, shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>

namespace lorakit::blockwise8 {

constexpr int64_t kCodeSize = 256;
// Zero blocks are scaled by this instead of 0, so they map to the code nearest 0, not to NaN.
constexpr float kMinAbsmax = 1e-38f;

// A float32 code of 256 values (checked to be sorted when on the CPU); `op` prefixes errors.
void check_code(const at::Tensor& code, const char* op);
void check_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize);
void check_dequantize_args(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, at::ScalarType dtype);

}  // namespace lorakit::blockwise8
