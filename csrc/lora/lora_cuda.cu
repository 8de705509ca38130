// LoRA linear on CUDA. Dense base: lora_common.cpp (cuBLAS through ATen). NF4 base, two paths:
//  - many rows (training, prefill): the weight is expanded into a workspace by nf4_dequantize and
//    one cuBLAS GEMM writes the output, with the bias in its beta term and the low-rank update
//    accumulated into the same output by a second, rank-r GEMM;
//  - 1 to 16 rows (decode): nf4_gemv_kernel (lora_kernels.cuh) reads the 4-bit codes directly,
//    then the low-rank update.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "lora/lora_common.h"
#include "lora/lora_kernels.cuh"

namespace lorakit::lora {
namespace {

// ---- glue ---------------------------------------------------------------------------------------

// The whole (out, in) weight in `dtype`, through the registered nf4_dequantize kernel.
at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                             int64_t out, int64_t in, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lorakit::nf4_dequantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               c10::SymIntArrayRef, at::ScalarType)>();
  const c10::SymInt shape[] = {c10::SymInt(out), c10::SymInt(in)};
  return op.call(packed, absmax, blocksize, c10::SymIntArrayRef(shape, 2), dtype);
}

Forward lora_linear_nf4_cuda(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& absmax, int64_t blocksize,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale,
                             const std::optional<at::Tensor>& x_lora,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code, double nested_offset) {
  constexpr const char* op = "lora_linear_nf4";
  const Sizes s = check_adapter_args(op, x, lora_b.size(0), bias, lora_a, lora_b, x_lora, scale);
  const Nf4Scales scales = check_nf4_weight(op, x, packed, absmax, blocksize, s.out, nested_absmax,
                                            nested_code, nested_offset);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = rows(x).contiguous();
  at::Tensor y;
  if (s.tokens <= kMaxDecodeRows && s.in % kValuesPerLane == 0) {
    y = at::empty({s.tokens, s.out}, x.options());
    const at::Tensor p = packed.contiguous();
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    LORAKIT_DISPATCH_FLOAT(x.scalar_type(), "lora_linear_nf4_cuda", [&] {
      launch_nf4_gemv(StreamLaunch{at::cuda::getCurrentCUDAStream()}, p.const_data_ptr<uint8_t>(),
                      scales.view(), blocksize, s.in, s.out, x2.const_data_ptr<scalar_t>(),
                      static_cast<int>(s.tokens), bias ? b.const_data_ptr<scalar_t>() : nullptr,
                      y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const at::Tensor w =
        dequantize_weight(packed, scales.expanded(), blocksize, s.out, s.in, x.scalar_type());
    y = bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  }
  at::Tensor xa = add_low_rank_(y, low_rank_input(x, x_lora), lora_a, lora_b, scale);
  return unflatten(x, y, xa);
}

Backward lora_linear_nf4_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                       const std::optional<at::Tensor>& x_lora,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       double nested_offset) {
  constexpr const char* op = "lora_linear_nf4_backward";
  const Sizes s =
      check_adapter_args(op, x, lora_b.size(0), std::nullopt, lora_a, lora_b, x_lora, scale);
  const Nf4Scales scales = check_nf4_weight(op, x, packed, absmax, blocksize, s.out, nested_absmax,
                                            nested_code, nested_offset);
  check_grad_y(op, grad_y, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_y.reshape({s.tokens, s.out});
  at::Tensor grad_x = at::mm(
      g, dequantize_weight(packed, scales.expanded(), blocksize, s.out, s.in, x.scalar_type()));
  auto [grad_xa, grad_a, grad_b] = low_rank_backward(g, low_rank_input(x, x_lora), lora_a, lora_b,
                                                     rows(xa), scale, x_lora ? nullptr : &grad_x);
  return unflatten_grads(x, grad_x, grad_xa, grad_a, grad_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("lora_linear", &lora_linear_dense);
  m.impl("lora_linear_backward", &lora_linear_dense_backward);
  m.impl("lora_linear_nf4", &lora_linear_nf4_cuda);
  m.impl("lora_linear_nf4_backward", &lora_linear_nf4_backward_cuda);
}

}  // namespace lorakit::lora
