#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "nf4/nf4_kernels.cuh"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;

LORAKIT_EMU_API int emu_nf4_quantize(int dtype, const void* w, int64_t n, int64_t blocksize,
                                     uint8_t* packed, float* absmax, char* error, size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::nf4::launch_quantize(Launch{}, static_cast<const T*>(w), n, blocksize, packed,
                                    absmax);
    });
  });
}

LORAKIT_EMU_API int emu_nf4_dequantize(int dtype, const uint8_t* packed, const float* absmax,
                                       int64_t n, int64_t blocksize, void* out, char* error,
                                       size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::nf4::launch_dequantize(Launch{}, packed, absmax, n, blocksize, static_cast<T*>(out));
    });
  });
}
