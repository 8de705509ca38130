// LoRA merge on CUDA. Dense: one kernel, W += s * B A in place. NF4: composed from the registered
// NF4 kernels (dequantize to float32, the dense merge kernel, quantize), so the bytes follow
// nf4_quantize exactly; it holds a float32 copy of the weight meanwhile (4 bytes per weight),
// which a fused per-block kernel would avoid.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/dispatch.h"
#include "merge/merge_checks.h"

namespace lorakit::merge {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// ---- device code ------------------------------------------------------------------------------

// Grid-stride over rows (y) and columns (x): w[i, j] += scale * sum_k b[i, k] a[k, j] in float32,
// rounded once. A warp reads 32 consecutive columns of each row of A (coalesced); b[i, k] is the
// same for the whole warp (a broadcast).
template <typename scalar_t>
__global__ void lora_merge_kernel(scalar_t* __restrict__ w, const float* __restrict__ a,
                                  const float* __restrict__ b, int64_t out, int64_t in, int64_t r,
                                  float scale) {
  for (int64_t i = blockIdx.y; i < out; i += gridDim.y) {
    for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < in;
         j += int64_t{gridDim.x} * blockDim.x) {
      float acc = 0.0f;
      for (int64_t k = 0; k < r; ++k) acc += b[i * r + k] * a[k * in + j];
      scalar_t& x = w[i * in + j];
      x = static_cast<scalar_t>(static_cast<float>(x) + scale * acc);
    }
  }
}

// ---- launcher -----------------------------------------------------------------------------------

template <typename scalar_t>
void launch_merge(scalar_t* w, const float* a, const float* b, int64_t out, int64_t in, int64_t r,
                  float scale, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(in, kThreads), 1024)),
                  static_cast<unsigned>(std::min(out, kMaxGridY)));
  lora_merge_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(w, a, b, out, in, r, scale);
}

// ---- glue ---------------------------------------------------------------------------------------

void lora_merge_cuda(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     double scale) {
  const int64_t r = check_lora_merge_args(weight, lora_a, lora_b);
  if (weight.numel() == 0 || r == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor a = lora_a.to(at::kFloat).contiguous();
  const at::Tensor b = lora_b.to(at::kFloat).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(weight.scalar_type(), "lora_merge_cuda", [&] {
    launch_merge(weight.mutable_data_ptr<scalar_t>(), a.const_data_ptr<float>(),
                 b.const_data_ptr<float>(), weight.size(0), weight.size(1), r,
                 static_cast<float>(scale), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_merge_cuda(const at::Tensor& packed,
                                                       const at::Tensor& absmax, int64_t blocksize,
                                                       at::IntArrayRef shape,
                                                       const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, double scale) {
  check_nf4_lora_merge_args(packed, absmax, blocksize, shape, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(packed.device());
  static const auto dequantize =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorakit::nf4_dequantize", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::SymIntArrayRef,
                            at::ScalarType)>();
  static const auto quantize =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lorakit::nf4_quantize", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  const c10::SymInt sizes[] = {c10::SymInt(shape[0]), c10::SymInt(shape[1])};
  at::Tensor weight =
      dequantize.call(packed, absmax, blocksize, c10::SymIntArrayRef(sizes, 2), at::kFloat);
  lora_merge_cuda(weight, lora_a, lora_b, scale);
  return quantize.call(weight, blocksize);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("lora_merge_", &lora_merge_cuda);
  m.impl("nf4_lora_merge", &nf4_lora_merge_cuda);
}

}  // namespace lorakit::merge
