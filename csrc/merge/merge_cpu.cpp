// LoRA merge on the CPU: W += s * B A in place, and the same inside an NF4 weight, block by block.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "merge/merge_checks.h"
#include "nf4/nf4_dequantize_cpu.h"
#include "nf4/nf4_quantize_cpu.h"

namespace lorakit::merge {
namespace {

// ---- device code ------------------------------------------------------------------------------

// Rows [first, last) of w (out, in): w[i] += scale * sum_k b[i, k] a[k], the sum in float32 and
// the result rounded once to scalar_t. The inner loops run over contiguous j and vectorise.
template <typename scalar_t>
void merge_rows(scalar_t* w, const float* a, const float* b, int64_t in, int64_t r, float scale,
                int64_t first, int64_t last) {
  std::vector<float> acc(in);
  for (int64_t i = first; i < last; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < r; ++k) {
      const float bk = b[i * r + k];
      const float* ak = a + k * in;
      for (int64_t j = 0; j < in; ++j) acc[j] += bk * ak[j];
    }
    scalar_t* row = w + i * in;
    for (int64_t j = 0; j < in; ++j)
      row[j] = static_cast<scalar_t>(static_cast<float>(row[j]) + scale * acc[j]);
  }
}

// NF4 blocks [first, last) of an (out, in) weight of n values: each block is expanded to float32,
// gets scale * (B A)[i, j] added at each of its elements (a block may span rows), and is quantized
// again exactly as nf4_quantize quantizes a float32 tensor. a_t is A transposed (in, r).
void merge_nf4_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t in,
                      int64_t blocksize, const float* a_t, const float* b, int64_t r, float scale,
                      int64_t first, int64_t last, uint8_t* packed_out, float* absmax_out) {
  float values[4096];  // the largest supported blocksize
  for (int64_t block = first; block < last; ++block) {
    const int64_t start = block * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    nf4::dequantize_block_scalar(packed, absmax, n, blocksize, block, values);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t i = (start + t) / in, j = (start + t) % in;
      float dot = 0.0f;
      for (int64_t k = 0; k < r; ++k) dot += b[i * r + k] * a_t[j * r + k];
      values[t] += scale * dot;
    }
    nf4::quantize_block(values, len, blocksize, packed_out + start / 2, absmax_out + block);
  }
}

// ---- glue ---------------------------------------------------------------------------------------

void lora_merge_cpu(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scale) {
  const int64_t r = check_lora_merge_args(weight, lora_a, lora_b, scale);
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0 || r == 0) return;
  const at::Tensor a = lora_a.to(at::kFloat).contiguous();
  const at::Tensor b = lora_b.to(at::kFloat).contiguous();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (in * r));  // ~256K FMAs a task
  LORAKIT_DISPATCH_FLOAT(weight.scalar_type(), "lora_merge_cpu", [&] {
    scalar_t* w = weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out, grain, [&](int64_t first, int64_t last) {
      merge_rows(w, a.const_data_ptr<float>(), b.const_data_ptr<float>(), in, r,
                 static_cast<float>(scale), first, last);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_merge_cpu(const at::Tensor& packed,
                                                      const at::Tensor& absmax, int64_t blocksize,
                                                      at::IntArrayRef shape,
                                                      const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, double scale) {
  const int64_t r =
      check_nf4_lora_merge_args(packed, absmax, blocksize, shape, lora_a, lora_b, scale);
  const int64_t n = shape[0] * shape[1], in = shape[1];
  const at::Tensor p = packed.contiguous().view(-1);
  const at::Tensor s = absmax.contiguous().view(-1);
  at::Tensor packed_out = at::empty_like(p);
  at::Tensor absmax_out = at::empty_like(s);
  const at::Tensor a_t = lora_a.to(at::kFloat).t().contiguous();
  const at::Tensor b = lora_b.to(at::kFloat).contiguous();
  at::parallel_for(0, s.numel(), nf4::grain_blocks(blocksize), [&](int64_t first, int64_t last) {
    merge_nf4_blocks(p.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), n, in, blocksize,
                     a_t.const_data_ptr<float>(), b.const_data_ptr<float>(), r,
                     static_cast<float>(scale), first, last, packed_out.mutable_data_ptr<uint8_t>(),
                     absmax_out.mutable_data_ptr<float>());
  });
  return {packed_out, absmax_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("lora_merge_", &lora_merge_cpu);
  m.impl("nf4_lora_merge", &nf4_lora_merge_cpu);
}

}  // namespace lorakit::merge
