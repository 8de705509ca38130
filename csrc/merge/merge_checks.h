// Argument checks for the merge ops, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

namespace lorakit::merge {

// Checks lora_a (r, in) and lora_b (out, r) against an (out, in) weight on `device`, and that the
// scale is finite; returns r.
int64_t check_adapter(const char* op, int64_t out, int64_t in, const at::Device& device,
                      const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);

// Checks a dense weight to be updated in place; returns r.
int64_t check_lora_merge_args(const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, double scale);

// Checks an NF4 weight of `shape` (out, in) and its adapter; returns r.
int64_t check_nf4_lora_merge_args(const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, at::IntArrayRef shape,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);

}  // namespace lorakit::merge
