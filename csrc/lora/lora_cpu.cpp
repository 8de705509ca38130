// LoRA linear on the CPU. Dense base: lora_common.cpp. NF4 base: the weight is expanded one tile
// of output rows at a time into a reused buffer, with one GEMM per tile writing (or, backward,
// accumulating) straight into the result; a few input rows (decode) skip the expansion and read
// the 4-bit codes directly.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/dispatch.h"
#include "lora/lora_common.h"
#include "lora/low_rank_rows.h"
#include "lora/nf4_gemv.h"
#include "nf4/nf4_dequantize_cpu.h"

namespace lorakit::lora {
namespace {

// Bytes of expanded weight per tile. Within L3 (32 MiB on the 2-core benchmark machine) so the
// GEMM reads the tile from cache right after it is written, yet large enough that the GEMMs stay
// few: each call synchronises the threads. For a 2048x2048 float32 layer at 1024 tokens on a
// loaded 2-core machine, 256-row tiles took ~1.5x the dense LoRA time, 8 MiB tiles ~1.2x.
constexpr int64_t kTileBytes = int64_t{8} << 20;
// Up to this many input rows, reading the codes directly beats expanding the weight.
constexpr int64_t kDecodeRows = 16;
// Output rows per parallel task of the direct kernel.
constexpr int64_t kDecodeGrain = 64;

// About kTileBytes of rows, rounded to a multiple of the row count after which a tile starts on
// an NF4 block boundary (1 whenever in is a multiple of the blocksize).
int64_t tile_rows(int64_t in, int64_t blocksize, int64_t element_size) {
  const int64_t step = blocksize / std::gcd(in, blocksize);
  const int64_t rows = kTileBytes / std::max<int64_t>(1, in * element_size);
  return std::max(step, rows / step * step);
}

// Expands rows [row0, row0 + count) of the (out, in) NF4 weight into tile (count, in).
void dequantize_rows(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                     int64_t out, int64_t in, int64_t row0, int64_t count, at::Tensor& tile) {
  const int64_t n = out * in;
  const int64_t first = row0 * in / blocksize;
  const int64_t last = ceil_div((row0 + count) * in, blocksize);
  const nf4::ExpandNibbles expand = nf4::expand_kernel();
  LORAKIT_DISPATCH_FLOAT(tile.scalar_type(), "lora_dequantize_rows", [&] {
    const uint8_t* p = packed.const_data_ptr<uint8_t>();
    const float* a = absmax.const_data_ptr<float>();
    scalar_t* dst = tile.mutable_data_ptr<scalar_t>();
    at::parallel_for(first, last, nf4::grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      nf4::dequantize_blocks(p, a, n, blocksize, b0, b1, dst + (b0 - first) * blocksize, expand);
    });
  });
}

// Calls f(row0, count, tile) for each tile of the weight's rows, tile holding them expanded.
template <typename F>
void for_each_tile(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                   int64_t out, int64_t in, const at::TensorOptions& options, F&& f) {
  const int64_t rows_per_tile =
      tile_rows(in, blocksize, c10::elementSize(options.dtype().toScalarType()));
  at::Tensor buffer = at::empty({std::min(rows_per_tile, out), in}, options);
  for (int64_t row0 = 0; row0 < out; row0 += rows_per_tile) {
    const int64_t count = std::min(rows_per_tile, out - row0);
    at::Tensor tile = buffer.narrow(0, 0, count);
    dequantize_rows(packed, absmax, blocksize, out, in, row0, count, tile);
    f(row0, count, tile);
  }
}

bool use_direct_kernel(const Sizes& s) {
  return s.tokens <= kDecodeRows && s.in % 32 == 0 && cpu_isa() >= CpuIsa::kAvx2;
}

// y = x W^T in float32 from the 4-bit codes, for a few rows of x, by the kernel of the CPU's
// level. bfloat16 x meets the codes rounded to bfloat16 at the avx2 level (widened to float32) and
// the avx512_bf16 one (in bf16 dot products); every other case, the avx512 level included, meets
// the exact float32 codes. finish(begin, end, y) runs on each range of output rows as soon as the
// kernel has written it, on the same thread.
template <typename Finish>
void nf4_gemv(const at::Tensor& x2, const at::Tensor& packed, const BlockScales& scales,
              int64_t blocksize, const Sizes& s, Finish&& finish) {
  const CpuIsa isa = cpu_isa();
  at::Tensor y = at::empty({s.tokens, s.out}, x2.options().dtype(at::kFloat));
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  float* out = y.mutable_data_ptr<float>();
  const auto run = [&](auto kernel, const auto* x) {
    at::parallel_for(0, s.out, kDecodeGrain, [&](int64_t begin, int64_t end) {
      kernel(p, scales, blocksize, s.in, x, s.tokens, begin, end, out, s.out);
      finish(begin, end, static_cast<const float*>(out));
    });
  };
  if (isa >= CpuIsa::kAvx512Bf16 && x2.scalar_type() == at::kBFloat16) {
    const at::Tensor xb = x2.contiguous();
    run(LORAKIT_X86_KERNEL(nf4_gemv_avx512_bf16),
        reinterpret_cast<const uint16_t*>(xb.const_data_ptr()));
    return;
  }
  const at::Tensor x32 = x2.to(at::kFloat).contiguous();
  if (isa >= CpuIsa::kAvx512) {
    run(LORAKIT_X86_KERNEL(nf4_gemv_avx512), x32.const_data_ptr<float>());
    return;
  }
  at::Tensor xs = at::empty_like(x32);
  if (x2.scalar_type() == at::kBFloat16) {
    LORAKIT_X86_KERNEL(order_for_gemv_bf16)(x32.const_data_ptr<float>(), x32.numel(),
                                            xs.mutable_data_ptr<float>());
    run(LORAKIT_X86_KERNEL(nf4_gemv_avx2_bf16), xs.const_data_ptr<float>());
    return;
  }
  LORAKIT_X86_KERNEL(order_for_gemv)(x32.const_data_ptr<float>(), x32.numel(),
                                     xs.mutable_data_ptr<float>());
  run(LORAKIT_X86_KERNEL(nf4_gemv_avx2), xs.const_data_ptr<float>());
}

// The forward of a few rows (decode): the base product from the codes, then bias and low-rank
// term added in float32 and rounded once (low_rank_rows.h), row range by row range.
Forward nf4_decode_forward(const at::Tensor& x, const at::Tensor& x2, const at::Tensor& x_lora,
                           const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scale, const Sizes& s) {
  at::Tensor y = at::empty({s.tokens, s.out}, x.options());
  at::Tensor xa = at::empty({s.tokens, s.rank}, x.options());
  LORAKIT_DISPATCH_FLOAT(x.scalar_type(), "lora_linear_nf4_decode", [&] {
    const at::Tensor xl = x_lora.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
    const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
    std::vector<float> xa32(static_cast<size_t>(s.tokens * s.rank));
    compute_xa(xl.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), s.tokens, s.in, s.rank,
               xa32.data());
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    const auto s_scale = static_cast<float>(scale);
    nf4_gemv(x2, packed, scales, blocksize, s, [&](int64_t begin, int64_t end, const float* base) {
      finish_rows(base, bias_ptr, xa32.data(), b_ptr, s_scale, s.tokens, s.out, s.rank, begin, end,
                  y_ptr);
    });
    scalar_t* xa_ptr = xa.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < xa32.size(); ++i) xa_ptr[i] = static_cast<scalar_t>(xa32[i]);
  });
  return unflatten(x, y, xa);
}

Forward lora_linear_nf4_cpu(const at::Tensor& x, const at::Tensor& packed_in,
                            const at::Tensor& absmax, int64_t blocksize,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale,
                            const std::optional<at::Tensor>& x_lora,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double nested_offset) {
  constexpr const char* op = "lora_linear_nf4";
  const Sizes s = check_adapter_args(op, x, lora_b.size(0), bias, lora_a, lora_b, x_lora, scale);
  const Nf4Scales scales = check_nf4_weight(op, x, packed_in, absmax, blocksize, s.out,
                                            nested_absmax, nested_code, nested_offset);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor x2 = rows(x);
  const at::Tensor xl = low_rank_input(x, x_lora);

  if (use_direct_kernel(s))
    return nf4_decode_forward(x, x2, xl, packed, scales.view(), blocksize, bias, lora_a, lora_b,
                              scale, s);

  at::Tensor y = at::empty({s.tokens, s.out}, x.options());
  for_each_tile(packed, scales.expanded(), blocksize, s.out, s.in, x.options(),
                [&](int64_t row0, int64_t count, const at::Tensor& tile) {
                  at::Tensor y_tile = y.narrow(1, row0, count);
                  if (bias) {
                    at::addmm_out(y_tile, bias->narrow(0, row0, count), x2, tile.t());
                  } else {
                    at::mm_out(y_tile, x2, tile.t());
                  }
                });
  at::Tensor xa = add_low_rank_(y, xl, lora_a, lora_b, scale);
  return unflatten(x, y, xa);
}

Backward lora_linear_nf4_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& packed_in, const at::Tensor& absmax,
                                      int64_t blocksize, const at::Tensor& lora_a,
                                      const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                      const std::optional<at::Tensor>& x_lora,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      double nested_offset) {
  constexpr const char* op = "lora_linear_nf4_backward";
  const Sizes s =
      check_adapter_args(op, x, lora_b.size(0), std::nullopt, lora_a, lora_b, x_lora, scale);
  const Nf4Scales scales = check_nf4_weight(op, x, packed_in, absmax, blocksize, s.out,
                                            nested_absmax, nested_code, nested_offset);
  check_grad_y(op, grad_y, s);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor g = grad_y.reshape({s.tokens, s.out});

  // grad_x = sum over tiles of grad_y[:, tile] W[tile, :], accumulated in place.
  at::Tensor grad_x = s.out == 0 ? at::zeros({s.tokens, s.in}, x.options())
                                 : at::empty({s.tokens, s.in}, x.options());
  for_each_tile(packed, scales.expanded(), blocksize, s.out, s.in, x.options(),
                [&](int64_t row0, int64_t count, const at::Tensor& tile) {
                  const at::Tensor g_tile = g.narrow(1, row0, count);
                  if (row0 == 0) {
                    at::mm_out(grad_x, g_tile, tile);
                  } else {
                    grad_x.addmm_(g_tile, tile);
                  }
                });
  auto [grad_xa, grad_a, grad_b] = low_rank_backward(g, low_rank_input(x, x_lora), lora_a, lora_b,
                                                     rows(xa), scale, x_lora ? nullptr : &grad_x);
  return unflatten_grads(x, grad_x, grad_xa, grad_a, grad_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("lora_linear", &lora_linear_dense);
  m.impl("lora_linear_backward", &lora_linear_dense_backward);
  m.impl("lora_linear_nf4", &lora_linear_nf4_cpu);
  m.impl("lora_linear_nf4_backward", &lora_linear_nf4_backward_cpu);
}

}  // namespace lorakit::lora
