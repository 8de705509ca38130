// AdamW steps on the CPU: glue around the raw-pointer kernels of adamw_kernels_impl.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "optim/adamw_args.h"
#include "optim/adamw_kernels.h"

namespace lorakit::optim {
namespace {

// Chunks big enough to amortise a task, small enough to split 1M-element tensors across cores.
constexpr int64_t kGrainElements = 1 << 16;

using Step32 = decltype(&baseline::adamw_step);
using Step8 = decltype(&baseline::adamw8bit_step);

// Tables for a code, built once per distinct code (an optimizer uses two), so a model with many
// small tensors does not rebuild them on every step. Shared, so that a step still holding tables
// keeps them when another thread's new code pushes them out of the cache.
std::shared_ptr<const CodeTables> code_tables(const at::Tensor& code) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const CodeTables>> cache;
  const at::Tensor c = code.contiguous();
  const float* values = c.const_data_ptr<float>();
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& t : cache)
    if (std::memcmp(t->code, values, sizeof t->code) == 0) return t;
  constexpr size_t kMaxCached = 16;  // codes are few; this only bounds misuse
  if (cache.size() == kMaxCached) cache.erase(cache.begin());
  auto tables = std::make_shared<CodeTables>();
  build_code_tables(values, *tables);
  cache.push_back(tables);
  return tables;
}

AdamWHyper hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t step, double grad_scale) {
  return AdamWHyper{lr, beta1, beta2, eps, weight_decay, step, grad_scale};
}

void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, double grad_scale) {
  check_adamw_args(param, grad, exp_avg, exp_avg_sq);
  const AdamWScalars s = make_scalars(hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale));
  const Step32 kernel =
      kernel_for_cpu_isa(&baseline::adamw_step, LORAKIT_X86_KERNEL(avx2::adamw_step),
                         LORAKIT_X86_KERNEL(avx512::adamw_step));
  const ParamType type = param_type(param);
  const int64_t width = param.element_size();
  auto* p = static_cast<char*>(param.mutable_data_ptr());
  const auto* g = static_cast<const char*>(grad.const_data_ptr());
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  at::parallel_for(0, param.numel(), kGrainElements, [&](int64_t first, int64_t last) {
    kernel(type, p + first * width, g + first * width, m + first, v + first, last - first, s);
  });
}

void adamw8bit_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                        at::Tensor& exp_avg_absmax, at::Tensor& exp_avg_sq,
                        at::Tensor& exp_avg_sq_absmax, const at::Tensor& exp_avg_code,
                        const at::Tensor& exp_avg_sq_code, double lr, double beta1, double beta2,
                        double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw8bit_args(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax,
                       exp_avg_code, exp_avg_sq_code);
  const AdamWScalars s = make_scalars(hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale));
  const std::shared_ptr<const CodeTables> m_tables = code_tables(exp_avg_code);
  const std::shared_ptr<const CodeTables> v_tables = code_tables(exp_avg_sq_code);
  const CodeTables& m_codes = *m_tables;
  const CodeTables& v_codes = *v_tables;
  const Step8 kernel =
      kernel_for_cpu_isa(&baseline::adamw8bit_step, LORAKIT_X86_KERNEL(avx2::adamw8bit_step),
                         LORAKIT_X86_KERNEL(avx512::adamw8bit_step));
  const ParamType type = param_type(param);
  const int64_t n = param.numel();
  void* p = param.mutable_data_ptr();
  const void* g = grad.const_data_ptr();
  uint8_t* qm = exp_avg.mutable_data_ptr<uint8_t>();
  uint8_t* qv = exp_avg_sq.mutable_data_ptr<uint8_t>();
  float* am = exp_avg_absmax.mutable_data_ptr<float>();
  float* av = exp_avg_sq_absmax.mutable_data_ptr<float>();
  at::parallel_for(0, ceil_div(n, kBlocksize), kGrainElements / kBlocksize,
                   [&](int64_t first, int64_t last) {
                     kernel(type, p, g, qm, am, qv, av, n, first, last, m_codes, v_codes, s);
                   });
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw8bit_step_", &adamw8bit_step_cpu);
}

}  // namespace lorakit::optim
