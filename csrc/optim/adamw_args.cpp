#include "optim/adamw_args.h"

#include <cmath>

#include "blockwise8/blockwise8_checks.h"
#include "common/checks.h"

namespace lorakit::optim {
namespace {

// In-place ops write through the data pointer, so every tensor must be one dense array (sparse
// tensors never get here: the dispatcher has no sparse kernel for these ops).
void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_param_and_grad(const at::Tensor& param, const at::Tensor& grad, const char* op) {
  check_contiguous(param, op, "param");
  check_contiguous(grad, op, "grad");
  TORCH_CHECK(is_supported_float(param.scalar_type()), op,
              ": param must be float32, float16 or bfloat16, got ", param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grad is ", grad.scalar_type(),
              " but param is ", param.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad has shape ", grad.sizes(),
              " but param has shape ", param.sizes());
  check_same_device(param, "param", grad, "grad");
}

void check_state(const at::Tensor& param, const at::Tensor& t, at::ScalarType dtype, int64_t numel,
                 const char* op, const char* name) {
  check_contiguous(t, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, expected ",
              numel);
  check_same_device(param, "param", t, name);
}

}  // namespace

AdamWScalars make_scalars(const AdamWHyper& h) {
  TORCH_CHECK(h.lr >= 0.0, "AdamW: lr must be >= 0, got ", h.lr);
  TORCH_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, "AdamW: beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, "AdamW: beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK(h.eps >= 0.0, "AdamW: eps must be >= 0, got ", h.eps);
  TORCH_CHECK(h.weight_decay >= 0.0, "AdamW: weight_decay must be >= 0, got ", h.weight_decay);
  TORCH_CHECK(h.step >= 1, "AdamW: step counts from 1, got ", h.step);
  TORCH_CHECK(std::isfinite(h.grad_scale) && h.grad_scale >= 0.0,
              "AdamW: grad_scale must be finite and >= 0, got ", h.grad_scale);
  return scalars_of(h);
}

void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq) {
  constexpr const char* op = "adamw_step_";
  check_param_and_grad(param, grad, op);
  check_state(param, exp_avg, at::kFloat, param.numel(), op, "exp_avg");
  check_state(param, exp_avg_sq, at::kFloat, param.numel(), op, "exp_avg_sq");
}

void check_adamw8bit_args(const at::Tensor& param, const at::Tensor& grad,
                          const at::Tensor& exp_avg, const at::Tensor& exp_avg_absmax,
                          const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_sq_absmax,
                          const at::Tensor& exp_avg_code, const at::Tensor& exp_avg_sq_code) {
  constexpr const char* op = "adamw8bit_step_";
  check_param_and_grad(param, grad, op);
  const int64_t n = param.numel();
  const int64_t blocks = ceil_div(n, kBlocksize);
  check_state(param, exp_avg, at::kByte, n, op, "exp_avg");
  check_state(param, exp_avg_sq, at::kByte, n, op, "exp_avg_sq");
  check_state(param, exp_avg_absmax, at::kFloat, blocks, op, "exp_avg_absmax");
  check_state(param, exp_avg_sq_absmax, at::kFloat, blocks, op, "exp_avg_sq_absmax");
  blockwise8::check_code(exp_avg_code, "adamw8bit_step_: exp_avg_code");
  blockwise8::check_code(exp_avg_sq_code, "adamw8bit_step_: exp_avg_sq_code");
  check_same_device(param, "param", exp_avg_code, "exp_avg_code");
  check_same_device(param, "param", exp_avg_sq_code, "exp_avg_sq_code");
}

ParamType param_type(const at::Tensor& param) {
  switch (param.scalar_type()) {
    case at::kHalf:
      return ParamType::kHalf;
    case at::kBFloat16:
      return ParamType::kBFloat16;
    default:
      return ParamType::kFloat;
  }
}

}  // namespace lorakit::optim
