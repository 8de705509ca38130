// AdamW steps on CUDA: the checked glue around the kernels of adamw_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "optim/adamw_args.h"
#include "optim/adamw_kernels.cuh"

namespace lorakit::optim {
namespace {

// c10's Half / BFloat16 convert to and from float on the device.
template <typename F>
void dispatch_param(const at::Tensor& param, F&& f) {
  switch (param_type(param)) {
    case ParamType::kFloat:
      return f(float{});
    case ParamType::kHalf:
      return f(c10::Half{});
    case ParamType::kBFloat16:
      return f(c10::BFloat16{});
  }
}

// ---- glue ---------------------------------------------------------------------------------------

void adamw_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                     at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double grad_scale) {
  check_adamw_args(param, grad, exp_avg, exp_avg_sq);
  const AdamWScalars s =
      make_scalars(AdamWHyper{lr, beta1, beta2, eps, weight_decay, step, grad_scale});
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_param(param, [&](auto tag) {
    using T = decltype(tag);
    launch_adamw(StreamLaunch{stream}, static_cast<T*>(param.mutable_data_ptr()),
                 static_cast<const T*>(grad.const_data_ptr()), exp_avg.mutable_data_ptr<float>(),
                 exp_avg_sq.mutable_data_ptr<float>(), param.numel(), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adamw8bit_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                         at::Tensor& exp_avg_absmax, at::Tensor& exp_avg_sq,
                         at::Tensor& exp_avg_sq_absmax, const at::Tensor& exp_avg_code,
                         const at::Tensor& exp_avg_sq_code, double lr, double beta1, double beta2,
                         double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw8bit_args(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax,
                       exp_avg_code, exp_avg_sq_code);
  const AdamWScalars s =
      make_scalars(AdamWHyper{lr, beta1, beta2, eps, weight_decay, step, grad_scale});
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor code_m = exp_avg_code.contiguous();
  const at::Tensor code_v = exp_avg_sq_code.contiguous();
  dispatch_param(param, [&](auto tag) {
    using T = decltype(tag);
    launch_adamw8bit(StreamLaunch{stream}, static_cast<T*>(param.mutable_data_ptr()),
                     static_cast<const T*>(grad.const_data_ptr()),
                     exp_avg.mutable_data_ptr<uint8_t>(), exp_avg_absmax.mutable_data_ptr<float>(),
                     exp_avg_sq.mutable_data_ptr<uint8_t>(),
                     exp_avg_sq_absmax.mutable_data_ptr<float>(), param.numel(),
                     code_m.const_data_ptr<float>(), code_v.const_data_ptr<float>(), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
}

}  // namespace lorakit::optim
