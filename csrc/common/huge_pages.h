// Asks Linux to back a large, freshly allocated CPU output with transparent huge pages.
//
// A fresh multi-MiB tensor comes from a new mmap, and writing it takes one page fault per 4 KiB:
// for a 32 MiB dequantized weight that is ~10 ms of faults on a 2-core machine, several times
// the kernel itself. With 2 MiB pages it is 512 times fewer faults. torch does the same for all
// its allocations when THP_MEM_ALLOC_ENABLE=1; here only the outputs of bandwidth-bound kernels
// ask for it. Best effort: a kernel with THP disabled ignores the advice.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lorakit {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < 4 * kHugePage) return;  // small outputs fault little; leave them alone
  const auto start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (start + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace lorakit
