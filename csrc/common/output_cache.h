// Large CPU outputs of the bandwidth-bound kernels, served from a cache of huge-page-backed
// buffers that earlier outputs released.
//
// A fresh multi-MiB tensor comes from a new mmap, and writing it takes one page fault per 4 KiB:
// for a 32 MiB dequantized weight that is ~10 ms of faults on a 2-core machine, several times the
// kernel itself. Asking for transparent huge pages (madvise) cuts the faults 512-fold but, where
// THP defrag is "madvise" (the common default), a fault that finds no free 2 MiB page compacts
// memory on the spot: single calls then stall for tens of milliseconds. Reusing buffers that are
// already faulted in, huge pages and all, avoids both: after the first call of a size, no fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

namespace lorakit {

// An uninitialised CPU tensor of `shape` and `options`. Outputs of 8 MiB and more reuse a cached
// buffer of the same rounded size when there is one (else a new one asking for huge pages); when
// the tensor is freed its buffer returns to the cache, which keeps at most
// LORAKIT_CPU_OUTPUT_CACHE_MB (default 512, 0 disables it) and frees the rest. Smaller outputs
// are plain at::empty.
at::Tensor empty_cpu_output(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace lorakit
