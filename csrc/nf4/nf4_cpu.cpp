// NF4 quantize / dequantize on the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "common/dispatch.h"
#include "common/output_cache.h"

#include <algorithm>

#include "common/checks.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_code.h"
#include "nf4/nf4_dequantize_cpu.h"
#include "nf4/nf4_quantize_cpu.h"

namespace lorakit::nf4 {
namespace {

// ---- device code ------------------------------------------------------------------------------

// Quantizes blocks [first, last) of w (n elements); a block starts on a byte (blocksize is even).
template <typename scalar_t>
void quantize_blocks(const scalar_t* w, int64_t n, int64_t blocksize, int64_t first, int64_t last,
                     uint8_t* packed, float* absmax) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * blocksize;
    quantize_block(w + start, std::min(blocksize, n - start), blocksize, packed + start / 2,
                   absmax + b);
  }
}

// ---- glue ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_quantize_args(w, blocksize);
  const at::Tensor x = w.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({ceil_div(n, 2)}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  LORAKIT_DISPATCH_FLOAT(x.scalar_type(), "nf4_quantize_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    uint8_t* p = packed.mutable_data_ptr<uint8_t>();
    float* a = absmax.mutable_data_ptr<float>();
    at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t first, int64_t last) {
      quantize_blocks(src, n, blocksize, first, last, p, a);
    });
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_dequantize_args(packed, absmax, blocksize, shape, dtype);
  at::Tensor out = empty_cpu_output(shape, packed.options().dtype(dtype));
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const ExpandNibbles expand = expand_kernel();
  LORAKIT_DISPATCH_FLOAT(dtype, "nf4_dequantize_cpu", [&] {
    const uint8_t* src = p.const_data_ptr<uint8_t>();
    const float* scales = a.const_data_ptr<float>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), grain_blocks(blocksize), [&](int64_t first, int64_t last) {
      dequantize_blocks(src, scales, n, blocksize, first, last, dst + first * blocksize, expand);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
}

}  // namespace lorakit::nf4
