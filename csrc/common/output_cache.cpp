#include "common/output_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lorakit {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = 4 * kHugePage;  // smaller outputs fault little; leave them alone

size_t limit_from_env() {
  const char* text = std::getenv("LORAKIT_CPU_OUTPUT_CACHE_MB");
  if (text == nullptr || *text == '\0') return size_t{512} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && mb >= 0,
              "LORAKIT_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got '", text, "'");
  return static_cast<size_t>(mb) << 20;
}

// Freed buffers by capacity (a multiple of the huge page size). Never destroyed: tensors freed
// during interpreter shutdown still return their buffers here.
class BufferCache {
 public:
  void* take(size_t capacity) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(capacity);
      if (it != free_.end()) {
        void* data = it->second;
        free_.erase(it);
        cached_ -= capacity;
        return data;
      }
    }
    void* data = std::aligned_alloc(kHugePage, capacity);
    TORCH_CHECK(data != nullptr, "out of memory allocating a ", capacity >> 20, " MiB output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, capacity, MADV_HUGEPAGE);  // best effort: ignored where THP is off
#endif
    return data;
  }

  void give_back(void* data, size_t capacity) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + capacity <= limit_) {
        free_.emplace(capacity, data);
        cached_ += capacity;
        return;
      }
    }
    std::free(data);
  }

  bool enabled() const { return limit_ > 0; }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  const size_t limit_ = limit_from_env();
};

BufferCache& cache() {
  static auto* instance = new BufferCache();
  return *instance;
}

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : shape) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kMinBytes || !cache().enabled()) return at::empty(shape, options);
  const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = cache().take(capacity);
  return at::from_blob(
      data, shape, [capacity](void* p) { cache().give_back(p, capacity); }, options);
}

}  // namespace lorakit
