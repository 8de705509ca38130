#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "lora/lora_kernels.cuh"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;

// absmax for float32 scales; or nested_q, nested_absmax, nested_code and offset for
// double-quantized ones (absmax null), as lora_common.cpp's Nf4Scales::view() fills BlockScales.
LORAKIT_EMU_API int emu_nf4_gemv(int dtype, const uint8_t* packed, const float* absmax,
                                 const uint8_t* nested_q, const float* nested_absmax,
                                 const float* nested_code, float offset, int64_t blocksize,
                                 int64_t in, int64_t out, const void* x, int m, const void* bias,
                                 void* y, char* error, size_t size) {
  return guarded(error, size, [&] {
    const lorakit::lora::BlockScales scales{absmax, nested_q, nested_absmax, nested_code, offset};
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::lora::launch_nf4_gemv(Launch{}, packed, scales, blocksize, in, out,
                                     static_cast<const T*>(x), m, static_cast<const T*>(bias),
                                     static_cast<T*>(y));
    });
  });
}
