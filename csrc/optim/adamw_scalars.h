// The float32 constants of one AdamW step, from its hyperparameters (checked by make_scalars in
// adamw_args.cpp). Torch-free, so that the CPU emulation of the CUDA kernels builds them the same
// way; included by baseline-ISA code only (see adamw_kernels.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "optim/adamw_kernels.h"

namespace lorakit::optim {

struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
  double grad_scale;
};

// Each constant computed in double, as torch.optim.AdamW does in Python, then rounded once.
inline AdamWScalars scalars_of(const AdamWHyper& h) {
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  return AdamWScalars{
      .decay = static_cast<float>(1.0 - h.lr * h.weight_decay),
      .one_minus_b1 = static_cast<float>(1.0 - h.beta1),
      .beta2 = static_cast<float>(h.beta2),
      .one_minus_b2 = static_cast<float>(1.0 - h.beta2),
      .neg_step_size = static_cast<float>(-(h.lr / bc1)),
      .bc2_sqrt = static_cast<float>(std::sqrt(bc2)),
      .eps = static_cast<float>(h.eps),
      .grad_scale = static_cast<float>(h.grad_scale),
  };
}

}  // namespace lorakit::optim
