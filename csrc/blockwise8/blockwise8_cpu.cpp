// Blockwise 8-bit quantize / dequantize on the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "blockwise8/blockwise8_checks.h"
#include "blockwise8/blockwise8_code.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "nf4/nf4_code.h"

namespace lorakit::blockwise8 {
namespace {

// ---- device code ------------------------------------------------------------------------------

template <typename scalar_t>
void quantize_blocks(const scalar_t* x, int64_t n, int64_t blocksize, int64_t first, int64_t last,
                     const float* midpoints, uint8_t* q, float* absmax) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i)
      amax = nf4::nan_max(amax, std::abs(static_cast<float>(x[start + i])));
    absmax[b] = amax;
    const float inverse = inverse_absmax(amax);
    for (int64_t i = 0; i < len; ++i)
      q[start + i] = nearest_code(static_cast<float>(x[start + i]) * inverse, midpoints);
  }
}

template <typename scalar_t>
void dequantize_blocks(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                       int64_t blocksize, int64_t first, int64_t last, scalar_t* out) {
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const float scale = absmax[b];
    for (int64_t i = start; i < start + len; ++i)
      out[i] = static_cast<scalar_t>(code[q[i]] * scale);
  }
}

int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

// ---- glue ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cpu(const at::Tensor& x,
                                                           const at::Tensor& code,
                                                           int64_t blocksize) {
  check_quantize_args(x, code, blocksize);
  const at::Tensor xc = x.contiguous();
  const at::Tensor c = code.contiguous();
  const int64_t n = xc.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, xc.options().dtype(at::kFloat));
  std::array<float, kCodeSize - 1> midpoints;
  const float* v = c.const_data_ptr<float>();
  for (int64_t i = 0; i + 1 < kCodeSize; ++i) midpoints[i] = (v[i] + v[i + 1]) / 2.0f;
  LORAKIT_DISPATCH_FLOAT(xc.scalar_type(), "blockwise8_quantize_cpu", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    uint8_t* qp = q.mutable_data_ptr<uint8_t>();
    float* a = absmax.mutable_data_ptr<float>();
    at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t first, int64_t last) {
      quantize_blocks(src, n, blocksize, first, last, midpoints.data(), qp, a);
    });
  });
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cpu(const at::Tensor& q, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  check_dequantize_args(q, absmax, code, blocksize, dtype);
  const at::Tensor qc = q.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options().dtype(dtype));
  const int64_t n = qc.numel();
  LORAKIT_DISPATCH_FLOAT(dtype, "blockwise8_dequantize_cpu", [&] {
    const uint8_t* src = qc.const_data_ptr<uint8_t>();
    const float* scales = a.const_data_ptr<float>();
    const float* values = c.const_data_ptr<float>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), grain_blocks(blocksize), [&](int64_t first, int64_t last) {
      dequantize_blocks(src, scales, values, n, blocksize, first, last, dst);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("blockwise8_quantize", &blockwise8_quantize_cpu);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cpu);
}

}  // namespace lorakit::blockwise8
