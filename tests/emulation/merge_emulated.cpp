#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "merge/merge_kernels.cuh"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;

LORAKIT_EMU_API int emu_lora_merge(int dtype, void* w, const float* a, const float* b, int64_t out,
                                   int64_t in, int64_t r, float scale, char* error, size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::merge::launch_merge(Launch{}, static_cast<T*>(w), a, b, out, in, r, scale);
    });
  });
}
