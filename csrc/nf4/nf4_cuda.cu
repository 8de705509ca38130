// NF4 quantize / dequantize on CUDA, bit for bit equal to nf4_cpu.cpp (and so to bitsandbytes):
// the checked glue around the kernels of nf4_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/dispatch.h"
#include "nf4/nf4_checks.h"
#include "nf4/nf4_kernels.cuh"

namespace lorakit::nf4 {
namespace {

// ---- glue ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w, int64_t blocksize) {
  check_quantize_args(w, blocksize);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = w.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2)}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(x.scalar_type(), "nf4_quantize_cuda", [&] {
    launch_quantize(StreamLaunch{stream}, x.const_data_ptr<scalar_t>(), n, blocksize,
                    packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_dequantize_args(packed, absmax, blocksize, shape, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(dtype, "nf4_dequantize_cuda", [&] {
    launch_dequantize(StreamLaunch{stream}, p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(),
                      n, blocksize, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
}

}  // namespace lorakit::nf4
