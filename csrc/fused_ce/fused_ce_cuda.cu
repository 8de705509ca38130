// Fused linear cross-entropy on CUDA: the row kernel of fused_ce_kernels.cuh (one block per row)
// inside the shared chunked pass, whose GEMMs run through cuBLAS on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "fused_ce/fused_ce_common.h"
#include "fused_ce/fused_ce_kernels.cuh"

namespace lorakit::fused_ce {
namespace {

void rows_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_scale,
               double scale, double softcap, bool write_grad, at::Tensor& logprobs) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(logits.scalar_type(), "fused_ce_rows_cuda", [&] {
    launch_fused_ce_rows(StreamLaunch{stream}, logits.mutable_data_ptr<scalar_t>(), logits.size(0),
                         logits.size(1), labels.const_data_ptr<int64_t>(),
                         row_scale.defined() ? row_scale.const_data_ptr<float>() : nullptr,
                         static_cast<float>(scale), static_cast<float>(softcap), write_grad,
                         logprobs.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, bool grad_hidden,
    bool grad_weight, int64_t chunk_tokens, double softcap) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return cross_entropy(hidden, weight, labels, grad_hidden, grad_weight, chunk_tokens, softcap,
                       &rows_cuda);
}

std::tuple<at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                 const at::Tensor& labels, bool grad_hidden,
                                                 int64_t chunk_tokens, double softcap) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return logprobs(hidden, weight, labels, grad_hidden, chunk_tokens, softcap, &rows_cuda);
}

std::tuple<at::Tensor, at::Tensor> logprobs_backward_cuda(const at::Tensor& grad,
                                                          const at::Tensor& hidden,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& labels,
                                                          bool grad_hidden, bool grad_weight,
                                                          int64_t chunk_tokens, double softcap) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return logprobs_backward(grad, hidden, weight, labels, grad_hidden, grad_weight, chunk_tokens,
                           softcap, &rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("fused_linear_cross_entropy", &cross_entropy_cuda);
  m.impl("fused_linear_logprobs", &logprobs_cuda);
  m.impl("fused_linear_logprobs_backward", &logprobs_backward_cuda);
}

}  // namespace lorakit::fused_ce
