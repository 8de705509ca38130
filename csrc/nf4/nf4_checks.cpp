#include "nf4/nf4_checks.h"

#include <c10/util/irange.h>

#include "common/checks.h"
#include "nf4/nf4_code.h"

namespace lorakit::nf4 {

void check_blocksize(int64_t blocksize) {
  for (int supported : kSupportedBlocksizes) {
    if (blocksize == supported) return;
  }
  TORCH_CHECK(false, "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (as in ",
              "bitsandbytes), got ", blocksize);
}

void check_quantize_args(const at::Tensor& w, int64_t blocksize) {
  check_float_tensor(w, "nf4_quantize: w");
  check_blocksize(blocksize);
}

int64_t check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  check_blocksize(blocksize);
  check_dtype(packed, at::kByte, "nf4_dequantize: packed");
  check_dtype(absmax, at::kFloat, "nf4_dequantize: absmax");
  check_same_device(packed, "nf4_dequantize: packed", absmax, "absmax");
  TORCH_CHECK(is_supported_float(dtype),
              "nf4_dequantize: dtype must be float32, float16 or bfloat16, got ", dtype);
  int64_t numel = 1;
  for (const auto d : shape) {
    TORCH_CHECK(d >= 0, "nf4_dequantize: shape has a negative size ", d);
    numel *= d;
  }
  TORCH_CHECK(packed.numel() == ceil_div(numel, 2), "nf4_dequantize: packed has ", packed.numel(),
              " bytes but shape ", shape, " needs ", ceil_div(numel, 2),
              " (two 4-bit values per byte)");
  TORCH_CHECK(absmax.numel() == ceil_div(numel, blocksize), "nf4_dequantize: absmax has ",
              absmax.numel(), " scales but shape ", shape, " with blocksize ", blocksize, " needs ",
              ceil_div(numel, blocksize));
  return numel;
}

}  // namespace lorakit::nf4
