#pragma once
// The launch policy of the *.cu glue: the launchers in the *_kernels.cuh headers call
// launch(name, kernel, grid, block, args...), which starts the kernel on this stream. Under the CPU
// emulation the same launchers take lorakit::emu::Launch instead (common/cuda_emulation.h).
#include <cuda_runtime.h>

#include <utility>

namespace lorakit {

struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(const char* /*name*/, void (*kernel)(Params...), dim3 grid, dim3 block,
                  Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  }
};

}  // namespace lorakit
