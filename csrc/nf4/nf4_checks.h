// Argument checks for the NF4 ops, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

namespace lorakit::nf4 {

void check_blocksize(int64_t blocksize);
void check_quantize_args(const at::Tensor& w, int64_t blocksize);
// Returns the element count of `shape`.
int64_t check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype);

}  // namespace lorakit::nf4
