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

#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "merge/merge_checks.h"
#include "merge/merge_kernels.cuh"

namespace lorakit::merge {
namespace {

// ---- glue ---------------------------------------------------------------------------------------

void lora_merge_cuda(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     double scale) {
  const int64_t r = check_lora_merge_args(weight, lora_a, lora_b, scale);
  if (weight.numel() == 0 || r == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor a = lora_a.to(at::kFloat).contiguous();
  const at::Tensor b = lora_b.to(at::kFloat).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(weight.scalar_type(), "lora_merge_cuda", [&] {
    launch_merge(StreamLaunch{stream}, weight.mutable_data_ptr<scalar_t>(),
                 a.const_data_ptr<float>(), b.const_data_ptr<float>(), weight.size(0),
                 weight.size(1), r, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_merge_cuda(const at::Tensor& packed,
                                                       const at::Tensor& absmax, int64_t blocksize,
                                                       at::IntArrayRef shape,
                                                       const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, double scale) {
  check_nf4_lora_merge_args(packed, absmax, blocksize, shape, lora_a, lora_b, scale);
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
