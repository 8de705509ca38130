#include "merge/merge_checks.h"

#include "common/checks.h"
#include "nf4/nf4_checks.h"

namespace lorakit::merge {

int64_t check_adapter(const char* op, int64_t out, int64_t in, const at::Device& device,
                      const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  check_finite_scale(op, scale);
  check_float_tensor(lora_a, "lora_a");
  check_float_tensor(lora_b, "lora_b");
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2, op, ": lora_a and lora_b must be 2-D, got ",
              lora_a.sizes(), " and ", lora_b.sizes());
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(lora_a.size(1) == in && lora_b.size(0) == out && lora_b.size(1) == r, op, ": lora_a ",
              lora_a.sizes(), " and lora_b ", lora_b.sizes(), " do not fit a weight ", "of shape [",
              out, ", ", in, "] (expected [r, ", in, "] and [", out, ", r])");
  TORCH_CHECK(lora_a.device() == device && lora_b.device() == device, op,
              ": lora_a and lora_b must be on the weight's device ", device);
  return r;
}

int64_t check_lora_merge_args(const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, double scale) {
  check_float_tensor(weight, "lora_merge_: weight");
  TORCH_CHECK(weight.dim() == 2, "lora_merge_: weight must be 2-D (out, in), got ", weight.sizes());
  // Updated in place through its data pointer; a strided view would need a copy back.
  TORCH_CHECK(weight.is_contiguous(), "lora_merge_: weight must be contiguous");
  return check_adapter("lora_merge_", weight.size(0), weight.size(1), weight.device(), lora_a,
                       lora_b, scale);
}

int64_t check_nf4_lora_merge_args(const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, at::IntArrayRef shape,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                  double scale) {
  TORCH_CHECK(shape.size() == 2, "nf4_lora_merge: shape must be (out, in), got ", shape);
  nf4::check_dequantize_args(packed, absmax, blocksize, shape, at::kFloat);
  return check_adapter("nf4_lora_merge", shape[0], shape[1], packed.device(), lora_a, lora_b,
                       scale);
}

}  // namespace lorakit::merge
