// Blockwise 8-bit quantize / dequantize on CUDA, bit for bit equal to blockwise8_cpu.cpp: the
// checked glue around the kernels of blockwise8_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blockwise8/blockwise8_checks.h"
#include "blockwise8/blockwise8_kernels.cuh"
#include "common/checks.h"
#include "common/cuda_launch.cuh"
#include "common/dispatch.h"

namespace lorakit::blockwise8 {
namespace {

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ---- glue ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(const at::Tensor& x,
                                                            const at::Tensor& code,
                                                            int64_t blocksize) {
  check_quantize_args(x, code, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor c = code.contiguous();
  const int64_t n = xc.numel();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, xc.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(xc.scalar_type(), "blockwise8_quantize_cuda", [&] {
    launch_quantize(StreamLaunch{stream}, sm_count(), xc.const_data_ptr<scalar_t>(), n, blocksize,
                    c.const_data_ptr<float>(), q.mutable_data_ptr<uint8_t>(),
                    absmax.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cuda(const at::Tensor& q, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize,
                                      at::ScalarType dtype) {
  check_dequantize_args(q, absmax, code, blocksize, dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options().dtype(dtype));
  const int64_t n = qc.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORAKIT_DISPATCH_FLOAT(dtype, "blockwise8_dequantize_cuda", [&] {
    launch_dequantize(StreamLaunch{stream}, sm_count(), qc.const_data_ptr<uint8_t>(),
                      a.const_data_ptr<float>(), c.const_data_ptr<float>(), n, blocksize,
                      out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CUDA, m) {
  m.impl("blockwise8_quantize", &blockwise8_quantize_cuda);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize_cuda);
}

}  // namespace lorakit::blockwise8
