#include "emulated_api.h"  // first: the CUDA keywords of the device code below

#include "fused_ce/fused_ce_kernels.cuh"

using lorakit::emu::dispatch_dtype;
using lorakit::emu::guarded;
using lorakit::emu::Launch;

LORAKIT_EMU_API int emu_fused_ce_rows(int dtype, void* logits, int64_t rows, int64_t vocab,
                                      const int64_t* labels, const float* row_scale, float scale,
                                      float softcap, int write_grad, float* logprobs, char* error,
                                      size_t size) {
  return guarded(error, size, [&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      lorakit::fused_ce::launch_fused_ce_rows(Launch{}, static_cast<T*>(logits), rows, vocab,
                                              labels, row_scale, scale, softcap, write_grad != 0,
                                              logprobs);
    });
  });
}
