#include "blockwise8/blockwise8_checks.h"

#include "common/checks.h"

namespace lorakit::blockwise8 {
namespace {

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two from 64 to 4096, got ", blocksize);
}

}  // namespace

void check_code(const at::Tensor& code, const char* op) {
  check_dtype(code, at::kFloat, op);
  TORCH_CHECK(code.dim() == 1 && code.numel() == kCodeSize, op,
              ": code must hold 256 values, got shape ", code.sizes());
  if (code.is_cpu()) {
    const at::Tensor c = code.contiguous();
    const float* v = c.const_data_ptr<float>();
    for (int64_t i = 1; i < kCodeSize; ++i)
      TORCH_CHECK(v[i - 1] <= v[i], op, ": code must be sorted ascending (entry ", i, ")");
  }
}

void check_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  check_float_tensor(x, "blockwise8_quantize: x");
  check_code(code, "blockwise8_quantize: code");
  check_same_device(x, "blockwise8_quantize: x", code, "code");
  check_blocksize(blocksize);
}

void check_dequantize_args(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, at::ScalarType dtype) {
  check_dtype(q, at::kByte, "blockwise8_dequantize: q");
  check_dtype(absmax, at::kFloat, "blockwise8_dequantize: absmax");
  check_code(code, "blockwise8_dequantize: code");
  check_same_device(q, "blockwise8_dequantize: q", absmax, "absmax");
  check_same_device(q, "blockwise8_dequantize: q", code, "code");
  check_blocksize(blocksize);
  TORCH_CHECK(is_supported_float(dtype),
              "blockwise8_dequantize: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(absmax.numel() == ceil_div(q.numel(), blocksize),
              "blockwise8_dequantize: absmax has ", absmax.numel(), " scales but ", q.numel(),
              " values with blocksize ", blocksize, " need ", ceil_div(q.numel(), blocksize));
}

}  // namespace lorakit::blockwise8
