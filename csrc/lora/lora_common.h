// The parts of the LoRA linear that are plain ATen calls and so run on any device: argument
// checks, the low-rank term and its gradients, and the whole op for a dense base weight.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "lora/nf4_scales.h"

namespace lorakit::lora {

using Forward = std::tuple<at::Tensor, at::Tensor>;                           // y, xa
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // x, xa, A, B

// Sizes of one call, after the leading dimensions of x are flattened into `tokens`.
struct Sizes {
  int64_t tokens, in, out, rank;
};

// Checks x, the adapter and the bias against each other, and that the scale is finite; `out` is
// the base weight's row count.
Sizes check_adapter_args(const char* op, const at::Tensor& x, int64_t out,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const std::optional<at::Tensor>& x_lora,
                         double scale);
// Checks grad_y against the forward's sizes.
void check_grad_y(const char* op, const at::Tensor& grad_y, const Sizes& s);

// An NF4 weight's block scales as the ops take them: float32 absmax, one per block; or, double-
// quantized, absmax holds uint8 codes into nested_code (float32, 256) scaled by nested_absmax
// (float32, one per 256 blocks) plus offset. All contiguous.
struct Nf4Scales {
  at::Tensor absmax, nested_absmax,
      nested_code;  // the nested pair undefined unless double-quantized
  float offset;

  // Float32 scales, one per block, for the paths that expand the whole weight anyway: absmax
  // itself, or the double-quantized ones through blockwise8_dequantize and + offset.
  at::Tensor expanded() const;
  // What the decode kernels read: they rebuild each block's scale as they reach it.
  BlockScales view() const;
};

// Checks an NF4 base weight of shape (out, in) (dtypes, devices, element counts) and returns its
// scales.
Nf4Scales check_nf4_weight(const char* op, const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& absmax, int64_t blocksize, int64_t out,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double nested_offset);

// The product of x's leading sizes (tokens), x viewed as (tokens, in), and the low-rank input (x
// itself when x_lora is empty) likewise.
int64_t leading(const at::Tensor& x);
at::Tensor rows(const at::Tensor& x);
at::Tensor low_rank_input(const at::Tensor& x, const std::optional<at::Tensor>& x_lora);

// y += scale * (x_lora A^T) B^T in place (one GEMM accumulating into y, no full-size temporary);
// returns xa = x_lora A^T, (tokens, r).
at::Tensor add_low_rank_(at::Tensor& y, const at::Tensor& x_lora, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale);

// Gradients of the low-rank term: grad_xa = scale * grad_y B, grad_A = grad_xa^T x_lora,
// grad_B = scale * grad_y^T xa. When fold_into is given, grad_xa A is accumulated into it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_backward(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, at::Tensor* fold_into);

// Reshapes the 2-D results of a forward back to x's leading dimensions.
Forward unflatten(const at::Tensor& x, at::Tensor y, at::Tensor xa);
// Reshapes the 2-D results of a backward; grad_x was computed for x (tokens, in).
Backward unflatten_grads(const at::Tensor& x, at::Tensor grad_x, at::Tensor grad_xa,
                         at::Tensor grad_a, at::Tensor grad_b);

// The ops for a dense base weight: cuBLAS / CPU BLAS do the main product, with the bias in its
// beta term and the low-rank update accumulated into its output.
Forward lora_linear_dense(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale,
                          const std::optional<at::Tensor>& x_lora);
Backward lora_linear_dense_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                    const std::optional<at::Tensor>& x_lora);

}  // namespace lorakit::lora
