#include "lora/lora_common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "common/checks.h"
#include "nf4/nf4_checks.h"

namespace lorakit::lora {
namespace {

void check_matches_x(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              " but x is ", x.scalar_type(), "; cast one of them so that the dtypes match");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; move them to the same device");
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

}  // namespace

Sizes check_adapter_args(const char* op, const at::Tensor& x, int64_t out,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const std::optional<at::Tensor>& x_lora,
                         double scale) {
  check_finite_scale(op, scale);
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., in), got a scalar");
  const int64_t in = x.size(-1);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == in, op,
              ": lora_a must be (r, in) with in = ", in, ", got ", lora_a.sizes());
  const int64_t rank = lora_a.size(0);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == out && lora_b.size(1) == rank, op,
              ": lora_b must be (out, r) = (", out, ", ", rank, "), got ", lora_b.sizes());
  check_matches_x(op, lora_a, "lora_a", x);
  check_matches_x(op, lora_b, "lora_b", x);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be (out,) = (", out,
                ",), got ", bias->sizes());
    check_matches_x(op, *bias, "bias", x);
  }
  if (x_lora) {
    TORCH_CHECK(x_lora->sizes() == x.sizes(), op, ": x_lora must have x's shape ", x.sizes(),
                ", got ", x_lora->sizes());
    check_matches_x(op, *x_lora, "x_lora", x);
  }
  return {leading(x), in, out, rank};
}

void check_grad_y(const char* op, const at::Tensor& grad_y, const Sizes& s) {
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == s.out && grad_y.numel() == s.tokens * s.out,
              op, ": grad_y must have shape (..., ", s.out, ") with ", s.tokens, " rows, got ",
              grad_y.sizes());
}

Nf4Scales check_nf4_weight(const char* op, const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& absmax, int64_t blocksize, int64_t out,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double nested_offset) {
  nf4::check_blocksize(blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
              packed.scalar_type());
  check_same_device(packed, "packed", x, "x");
  check_same_device(absmax, "absmax", x, "x");
  const int64_t numel = out * x.size(-1);
  TORCH_CHECK(packed.numel() == ceil_div(numel, 2), op, ": packed has ", packed.numel(),
              " bytes but a (", out, ", ", x.size(-1), ") weight needs ", ceil_div(numel, 2));
  const int64_t blocks = ceil_div(numel, blocksize);
  TORCH_CHECK(absmax.numel() == blocks, op, ": absmax has ", absmax.numel(), " scales but a (", out,
              ", ", x.size(-1), ") weight with blocksize ", blocksize, " needs ", blocks);
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(), op,
              ": pass nested_absmax and nested_code together (double-quantized scales) or neither");
  if (!nested_absmax) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op,
                ": absmax must be float32, or uint8 with nested_absmax and nested_code, got ",
                absmax.scalar_type());
    return {absmax.contiguous(), at::Tensor(), at::Tensor(), 0.0f};
  }
  TORCH_CHECK(absmax.scalar_type() == at::kByte, op,
              ": absmax must be uint8 when nested_absmax is given, got ", absmax.scalar_type());
  TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat, op,
              ": nested_absmax must be float32, got ", nested_absmax->scalar_type());
  TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256, op,
              ": nested_code must be float32 with 256 values, got ", nested_code->scalar_type(),
              " ", nested_code->sizes());
  check_same_device(*nested_absmax, "nested_absmax", x, "x");
  check_same_device(*nested_code, "nested_code", x, "x");
  const int64_t nested_blocks = ceil_div(blocks, int64_t{1} << kNestedShift);
  TORCH_CHECK(nested_absmax->numel() == nested_blocks, op, ": nested_absmax has ",
              nested_absmax->numel(), " scales but ", blocks, " codes in blocks of ",
              int64_t{1} << kNestedShift, " need ", nested_blocks);
  // The schema's float is a double; offsets come from float32 scales, so the cast is exact.
  return {absmax.contiguous(), nested_absmax->contiguous(), nested_code->contiguous(),
          static_cast<float>(nested_offset)};
}

at::Tensor Nf4Scales::expanded() const {
  if (!nested_absmax.defined()) return absmax;
  static const auto dequantize =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorakit::blockwise8_dequantize", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            at::ScalarType)>();
  return dequantize.call(absmax, nested_absmax, nested_code, int64_t{1} << kNestedShift, at::kFloat)
      .add_(offset);
}

BlockScales Nf4Scales::view() const {
  if (!nested_absmax.defined())
    return {absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, 0.0f};
  return {nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
          nested_code.const_data_ptr<float>(), offset};
}

int64_t leading(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

at::Tensor rows(const at::Tensor& x) { return x.reshape({leading(x), x.size(-1)}); }

at::Tensor low_rank_input(const at::Tensor& x, const std::optional<at::Tensor>& x_lora) {
  return rows(x_lora ? *x_lora : x);
}

// The rank-r products below are skinny: one side of the result is r (8 to 64) wide. BLAS runs a
// product far faster when r is its row count than when r is its column count (on the AVX2 CPU
// with MKL, tokens 256, r 8, a 1536-wide layer: (B^T g^T)^T 0.17 ms against g B 0.57 ms, and
// (xa^T g)^T 0.17 ms against g^T xa 1.2 ms), so each is computed as the transpose of the product
// with r rows, then made contiguous again (a copy of r values per row: small beside the product),
// which the fake kernels' strides and the optimizer expect.
namespace {
at::Tensor mm_r_rows(const at::Tensor& a, const at::Tensor& b) {
  return at::mm(b.t(), a.t()).t().contiguous();
}
}  // namespace

at::Tensor add_low_rank_(at::Tensor& y, const at::Tensor& x_lora, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, double scale) {
  at::Tensor xa = mm_r_rows(x_lora, lora_a.t());
  if (lora_a.size(0) > 0) y.addmm_(xa, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  return xa;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_backward(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, at::Tensor* fold_into) {
  at::Tensor grad_xa = mm_r_rows(grad_y, lora_b).mul_(scale);
  at::Tensor grad_a = at::mm(grad_xa.t(), x_lora);
  at::Tensor grad_b = mm_r_rows(grad_y.t(), xa).mul_(scale);
  if (fold_into && lora_a.size(0) > 0) fold_into->addmm_(grad_xa, lora_a);
  return {grad_xa, grad_a, grad_b};
}

Forward unflatten(const at::Tensor& x, at::Tensor y, at::Tensor xa) {
  return {y.view(with_last(x, y.size(1))), xa.view(with_last(x, xa.size(1)))};
}

Backward unflatten_grads(const at::Tensor& x, at::Tensor grad_x, at::Tensor grad_xa,
                         at::Tensor grad_a, at::Tensor grad_b) {
  return {grad_x.view(x.sizes()), grad_xa.view(with_last(x, grad_xa.size(1))), grad_a, grad_b};
}

Forward lora_linear_dense(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, double scale,
                          const std::optional<at::Tensor>& x_lora) {
  constexpr const char* op = "lora_linear";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be (out, in), got ", weight.sizes());
  check_adapter_args(op, x, weight.size(0), bias, lora_a, lora_b, x_lora, scale);
  TORCH_CHECK(weight.size(1) == x.size(-1), op, ": weight is ", weight.sizes(), " but x has ",
              x.size(-1), " input features");
  check_matches_x(op, weight, "weight", x);
  const at::Tensor x2 = rows(x);
  at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor xa = add_low_rank_(y, low_rank_input(x, x_lora), lora_a, lora_b, scale);
  return unflatten(x, y, xa);
}

Backward lora_linear_dense_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                    const std::optional<at::Tensor>& x_lora) {
  constexpr const char* op = "lora_linear_backward";
  const Sizes s =
      check_adapter_args(op, x, weight.size(0), std::nullopt, lora_a, lora_b, x_lora, scale);
  check_grad_y(op, grad_y, s);
  const at::Tensor g = grad_y.reshape({s.tokens, s.out});
  at::Tensor grad_x = at::mm(g, weight);
  auto [grad_xa, grad_a, grad_b] = low_rank_backward(g, low_rank_input(x, x_lora), lora_a, lora_b,
                                                     rows(xa), scale, x_lora ? nullptr : &grad_x);
  return unflatten_grads(x, grad_x, grad_xa, grad_a, grad_b);
}

}  // namespace lorakit::lora
