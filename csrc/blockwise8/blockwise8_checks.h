// Argument checks for the blockwise 8-bit ops, shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include "blockwise8/blockwise8_code.h"  // kCodeSize, kMinAbsmax

namespace lorakit::blockwise8 {

// A float32 code of 256 values (checked to be sorted when on the CPU); `op` prefixes errors.
void check_code(const at::Tensor& code, const char* op);
void check_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize);
void check_dequantize_args(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, at::ScalarType dtype);

}  // namespace lorakit::blockwise8
