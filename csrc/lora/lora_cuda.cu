// LoRA linear on CUDA. Dense base: lora_common.cpp (cuBLAS through ATen). NF4 base, two paths:
//  - many rows (training, prefill): the weight is expanded into a workspace by nf4_dequantize and
//    one cuBLAS GEMM writes the output, with the bias in its beta term and the low-rank update
//    accumulated into the same output by a second, rank-r GEMM;
//  - 1 to 16 rows (decode): nf4_gemv_kernel reads the 4-bit codes directly (0.5625 bytes per
//    weight with 64-value blocks; double-quantized scales decoded in the kernel too), never
//    writing the expanded weight, then the low-rank update.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "lora/lora_common.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {
namespace {

constexpr int kMaxDecodeRows = 16;
constexpr int kWarpsPerBlock = 8;
constexpr int kValuesPerLane = 8;  // one 32-bit load of packed codes

// ---- device code ------------------------------------------------------------------------------

// The NF4 table for device code, initialised from the shared constexpr one (nf4_code.h).
__constant__ float kDeviceCode[16] = {
    nf4::kCode[0],  nf4::kCode[1],  nf4::kCode[2],  nf4::kCode[3], nf4::kCode[4],  nf4::kCode[5],
    nf4::kCode[6],  nf4::kCode[7],  nf4::kCode[8],  nf4::kCode[9], nf4::kCode[10], nf4::kCode[11],
    nf4::kCode[12], nf4::kCode[13], nf4::kCode[14], nf4::kCode[15]};

template <typename scalar_t>
__device__ __forceinline__ void load8(const scalar_t* p, float* out) {
#pragma unroll
  for (int j = 0; j < kValuesPerLane; ++j) out[j] = static_cast<float>(p[j]);
}

// One warp per output row o: y[i, o] = sum_k x[i, k] W[o, k] (+ bias[o]) for i < m. Each lane
// takes 8 consecutive weights per step (one 32-bit load; in % 8 == 0 keeps it aligned and inside
// one block), so a warp reads 128 contiguous bytes of codes per step.
template <typename scalar_t>
__global__ void nf4_gemv_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int shift,
                                int64_t in, int64_t out, const scalar_t* __restrict__ x, int m,
                                const scalar_t* __restrict__ bias, scalar_t* __restrict__ y) {
  // Lanes index both tables with different codes: shared, not constant, memory.
  __shared__ float code[16];
  __shared__ float nested_code[256];
  if (threadIdx.x < 16) code[threadIdx.x] = kDeviceCode[threadIdx.x];
  if (scales.code) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = scales.code[i];
    scales.code = nested_code;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (o >= out) return;

  float acc[kMaxDecodeRows] = {};
  const int64_t row = o * in;
  for (int64_t k = lane * kValuesPerLane; k < in; k += 32 * kValuesPerLane) {
    const uint32_t codes = *reinterpret_cast<const uint32_t*>(packed + (row + k) / 2);
    const float scale = block_scale(scales, (row + k) >> shift);
    float w[kValuesPerLane];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // byte b (little-endian) holds elements 2b (high), 2b+1
      const uint32_t byte = (codes >> (8 * b)) & 0xFF;
      w[2 * b] = code[byte >> 4] * scale;
      w[2 * b + 1] = code[byte & 0x0F] * scale;
    }
#pragma unroll
    for (int i = 0; i < kMaxDecodeRows; ++i) {
      if (i < m) {
        float xv[kValuesPerLane];
        load8(x + i * in + k, xv);
#pragma unroll
        for (int j = 0; j < kValuesPerLane; ++j) acc[i] = fmaf(w[j], xv[j], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxDecodeRows; ++i) {
    if (i < m) {
      float sum = acc[i];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        sum += __shfl_xor_sync(0xFFFFFFFF, sum, offset);
      if (lane == 0) {
        if (bias) sum += static_cast<float>(bias[o]);
        y[i * out + o] = static_cast<scalar_t>(sum);
      }
    }
  }
}

// ---- launcher -----------------------------------------------------------------------------------

template <typename scalar_t>
void launch_nf4_gemv(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                     int64_t in, int64_t out, const scalar_t* x, int m, const scalar_t* bias,
                     scalar_t* y) {
  if (out == 0 || m == 0) return;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const dim3 grid(static_cast<unsigned>(ceil_div(out, kWarpsPerBlock)));
  const dim3 block(32 * kWarpsPerBlock);
  nf4_gemv_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      packed, scales, shift, in, out, x, m, bias, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- glue ---------------------------------------------------------------------------------------

// The whole (out, in) weight in `dtype`, through the registered nf4_dequantize kernel.
at::Tensor dequantize_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                             int64_t out, int64_t in, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lorakit::nf4_dequantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               c10::SymIntArrayRef, at::ScalarType)>();
  const c10::SymInt shape[] = {c10::SymInt(out), c10::SymInt(in)};
  return op.call(packed, absmax, blocksize, c10::SymIntArrayRef(shape, 2), dtype);
}

Forward lora_linear_nf4_cuda(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& absmax, int64_t blocksize,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale,
                             const std::optional<at::Tensor>& x_lora,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code, double nested_offset) {
  constexpr const char* op = "lora_linear_nf4";
  const Sizes s = check_adapter_args(op, x, lora_b.size(0), bias, lora_a, lora_b, x_lora);
  const Nf4Scales scales = check_nf4_weight(op, x, packed, absmax, blocksize, s.out, nested_absmax,
                                            nested_code, nested_offset);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = rows(x).contiguous();
  at::Tensor y;
  if (s.tokens <= kMaxDecodeRows && s.in % kValuesPerLane == 0) {
    y = at::empty({s.tokens, s.out}, x.options());
    const at::Tensor p = packed.contiguous();
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    LORAKIT_DISPATCH_FLOAT(x.scalar_type(), "lora_linear_nf4_cuda", [&] {
      launch_nf4_gemv<scalar_t>(p.const_data_ptr<uint8_t>(), scales.view(), blocksize, s.in, s.out,
                                x2.const_data_ptr<scalar_t>(), static_cast<int>(s.tokens),
                                bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                y.mutable_data_ptr<scalar_t>());
    });
  } else {
    const at::Tensor w =
        dequantize_weight(packed, scales.expanded(), blocksize, s.out, s.in, x.scalar_type());
    y = bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  }
  at::Tensor xa = add_low_rank_(y, low_rank_input(x, x_lora), lora_a, lora_b, scale);
  return unflatten(x, y, xa);
}

Backward lora_linear_nf4_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                       const std::optional<at::Tensor>& x_lora,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       double nested_offset) {
  constexpr const char* op = "lora_linear_nf4_backward";
  const Sizes s = check_adapter_args(op, x, lora_b.size(0), std::nullopt, lora_a, lora_b, x_lora);
  const Nf4Scales scales = check_nf4_weight(op, x, packed, absmax, blocksize, s.out, nested_absmax,
                                            nested_code, nested_offset);
  check_grad_y(op, grad_y, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_y.reshape({s.tokens, s.out});
  at::Tensor grad_x = at::mm(
      g, dequantize_weight(packed, scales.expanded(), blocksize, s.out, s.in, x.scalar_type()));
  auto [grad_xa, grad_a, grad_b] = low_rank_backward(g, low_rank_input(x, x_lora), lora_a, lora_b,
                                                     rows(xa), scale, x_lora ? nullptr : &grad_x);
  return unflatten_grads(x, grad_x, grad_xa, grad_a, grad_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("lora_linear", &lora_linear_dense);
  m.impl("lora_linear_backward", &lora_linear_dense_backward);
  m.impl("lora_linear_nf4", &lora_linear_nf4_cuda);
  m.impl("lora_linear_nf4_backward", &lora_linear_nf4_backward_cuda);
}

}  // namespace lorakit::lora
