// The C interface of the emulated kernels (loaded by emulated.py through ctypes): each function
// runs one launcher of a csrc/**/*_kernels.cuh header under the CPU emulation, on raw pointers
// from torch CPU tensors. It returns 0, or 1 with the error (a KernelError: wrong launch, divergent
// barrier, bad shuffle) written to `error`.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <exception>

#include "common/cuda_emulation.h"

#define LORAKIT_EMU_API extern "C" __attribute__((visibility("default")))

namespace lorakit::emu {

// dtype codes of emulated.py: the element types the nvcc build instantiates (c10's, whose host
// conversions round to nearest even like the GPU's).
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(c10::Half{});
    case 2:
      return f(c10::BFloat16{});
    default:
      throw KernelError("emulated kernels: unknown dtype code " + std::to_string(dtype));
  }
}

template <typename F>
int guarded(char* error, size_t size, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, size, "%s", e.what());
    return 1;
  }
}

}  // namespace lorakit::emu
