#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "blockwise8/blockwise8_kernels.cuh"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;

LORAKIT_EMU_API int emu_blockwise8_quantize(int dtype, int sm_count, const void* x, int64_t n,
                                            int64_t blocksize, const float* code, uint8_t* q,
                                            float* absmax, char* error, size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::blockwise8::launch_quantize(Launch{}, sm_count, static_cast<const T*>(x), n,
                                           blocksize, code, q, absmax);
    });
  });
}

LORAKIT_EMU_API int emu_blockwise8_dequantize(int dtype, int sm_count, const uint8_t* q,
                                              const float* absmax, const float* code, int64_t n,
                                              int64_t blocksize, void* out, char* error,
                                              size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::blockwise8::launch_dequantize(Launch{}, sm_count, q, absmax, code, n, blocksize,
                                             static_cast<T*>(out));
    });
  });
}
