// Argument checks and per-step scalars of the AdamW ops, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include "optim/adamw_kernels.h"
#include "optim/adamw_scalars.h"

namespace lorakit::optim {

// Checks the hyperparameters and returns the float32 constants of this step.
AdamWScalars make_scalars(const AdamWHyper& h);

void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq);

void check_adamw8bit_args(const at::Tensor& param, const at::Tensor& grad,
                          const at::Tensor& exp_avg, const at::Tensor& exp_avg_absmax,
                          const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_sq_absmax,
                          const at::Tensor& exp_avg_code, const at::Tensor& exp_avg_sq_code);

ParamType param_type(const at::Tensor& param);

}  // namespace lorakit::optim
