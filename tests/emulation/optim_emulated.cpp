#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "optim/adamw_kernels.cuh"
#include "optim/adamw_scalars.h"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;
using lorakit::optim::AdamWHyper;
using lorakit::optim::scalars_of;

LORAKIT_EMU_API int emu_adamw_step(int dtype, void* param, const void* grad, float* exp_avg,
                                   float* exp_avg_sq, int64_t n, double lr, double beta1,
                                   double beta2, double eps, double weight_decay, int64_t step,
                                   double grad_scale, char* error, size_t size) {
  return guarded(error, size, [&] {
    const auto s = scalars_of(AdamWHyper{lr, beta1, beta2, eps, weight_decay, step, grad_scale});
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::optim::launch_adamw(Launch{}, static_cast<T*>(param), static_cast<const T*>(grad),
                                   exp_avg, exp_avg_sq, n, s);
    });
  });
}

LORAKIT_EMU_API int emu_adamw8bit_step(int dtype, void* param, const void* grad, uint8_t* qm,
                                       float* absmax_m, uint8_t* qv, float* absmax_v, int64_t n,
                                       const float* code_m, const float* code_v, double lr,
                                       double beta1, double beta2, double eps, double weight_decay,
                                       int64_t step, double grad_scale, char* error, size_t size) {
  return guarded(error, size, [&] {
    const auto s = scalars_of(AdamWHyper{lr, beta1, beta2, eps, weight_decay, step, grad_scale});
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::optim::launch_adamw8bit(Launch{}, static_cast<T*>(param),
                                       static_cast<const T*>(grad), qm, absmax_m, qv, absmax_v, n,
                                       code_m, code_v, s);
    });
  });
}
