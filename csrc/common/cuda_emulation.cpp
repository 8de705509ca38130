// The runtime of cuda_emulation.h: fibers, the per-block scheduler, barriers, shuffles, launches.
//
// A block runs on one OS thread, one warp after another. The scheduler switches to each ready
// fiber of the warp in lane order; a fiber runs until it waits (barrier, shuffle) or returns, then
// switches back. When none of the warp's lanes is ready, its shuffles resolve and it runs on, until
// every lane waits at a barrier or has returned; then the next warp. Once all warps are there, the
// barrier releases (every thread that has not returned waits at the same one). Anything else can
// never make progress, so it is reported as an error rather than waited on.
#include "common/cuda_emulation.h"

#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(LORAKIT_EMU_UCONTEXT)
#include <ucontext.h>
#define LORAKIT_EMU_USE_UCONTEXT 1
#endif

namespace lorakit::emu {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7FFFFFFFu;
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned kMaxBlockXY = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr size_t kStackBytes = 64 * 1024;  // kernels keep a few hundred bytes of locals

// ---- context switching --------------------------------------------------------------------------

#ifdef LORAKIT_EMU_USE_UCONTEXT
// Portable, but glibc's swapcontext also saves the signal mask: one system call per switch.
struct Context {
  ucontext_t uc;
};
void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#else
// x86-64 System V: save the callee-saved registers on the old stack, swap stack pointers,
// restore them from the new one. Everything else is caller-saved across this call.
extern "C" void lorakit_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type lorakit_emu_switch, @function
lorakit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lorakit_emu_switch, .-lorakit_emu_switch
)");
struct Context {
  void* sp;
};
// A fresh stack that lorakit_emu_switch "returns" into entry with the alignment of a call.
void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  *--top = nullptr;                              // entry's return address: entry never returns
  *--top = reinterpret_cast<void*>(entry);       // popped by ret
  for (int i = 0; i < 6; ++i) *--top = nullptr;  // rbp, rbx, r12-r15
  c.sp = top;
}
void switch_context(Context& from, Context& to) { lorakit_emu_switch(&from.sp, to.sp); }
#endif

// Stacks for up to kMaxThreadsPerBlock fibers, each with a guard page below it so that an
// overflow faults instead of corrupting a neighbour.
class StackPool {
 public:
  StackPool() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stride_ = kStackBytes + page_;
    base_ = static_cast<char*>(mmap(nullptr, stride_ * kMaxThreadsPerBlock, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base_ == MAP_FAILED) throw KernelError("cuda emulation: cannot map fiber stacks");
    for (int i = 0; i < kMaxThreadsPerBlock; ++i) mprotect(base_ + i * stride_, page_, PROT_NONE);
  }
  ~StackPool() { munmap(base_, stride_ * kMaxThreadsPerBlock); }
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;
  char* stack(int i) const { return base_ + i * stride_ + page_; }

 private:
  char* base_;
  size_t page_, stride_;
};

// ---- fibers and the block scheduler -------------------------------------------------------------

enum class State { kReady, kBarrier, kShuffle, kExited };

struct Fiber {
  ThreadIndex index;
  Context context;
  State state = State::kReady;
  std::source_location where;  // the barrier or shuffle it waits at
  // The shuffle it waits at, and its result once resolved.
  ShuffleKind kind = ShuffleKind::kIdx;
  unsigned mask = 0;
  int lane_arg = 0;
  int width = 0;
  uint64_t value = 0;
};

std::string site(const std::source_location& w) {
  std::string file = w.file_name();
  const size_t slash = file.rfind('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(w.line());
}

const char* shuffle_name(ShuffleKind k) {
  switch (k) {
    case ShuffleKind::kIdx:
      return "__shfl_sync";
    case ShuffleKind::kUp:
      return "__shfl_up_sync";
    case ShuffleKind::kDown:
      return "__shfl_down_sync";
    case ShuffleKind::kXor:
      return "__shfl_xor_sync";
  }
  return "?";
}

std::string describe(const Fiber& f) {
  switch (f.state) {
    case State::kReady:
      return "is running";
    case State::kBarrier:
      return "waits at __syncthreads (" + site(f.where) + ")";
    case State::kShuffle:
      return "waits at " + std::string(shuffle_name(f.kind)) + " (" + site(f.where) + ")";
    case State::kExited:
      return "has returned";
  }
  return "?";
}

// A module's thread-local storage as the calling thread sees it.
struct TlsBlock {
  char* data = nullptr;
  size_t size = 0;
};

// Runs blocks one after another on the OS thread that owns it.
class BlockRunner {
 public:
  void run(uint64_t launch, const char* kernel, uint3 block_idx, dim3 grid, dim3 block,
           void (*entry)(const void*), const void* args);

  // Called from inside fibers.
  void wait_at_barrier(const std::source_location& where);
  uint64_t wait_at_shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_arg, int width,
                           const std::source_location& where);

 private:
  static void fiber_main();
  [[noreturn]] void fail(const std::string& message) const;
  void fail_in_fiber(const std::string& message);
  void wait(State state, const std::source_location& where);
  bool resolve_shuffles(int warp);
  void run_warp(int warp);
  void resolve_barrier();
  std::string lane_name(int thread) const;

  StackPool stacks_;
  std::vector<Fiber> fibers_ = std::vector<Fiber>(kMaxThreadsPerBlock);
  Context scheduler_;
  int count_ = 0;
  int current_ = 0;
  std::string error_;
  const char* kernel_ = nullptr;
  uint3 block_idx_{};
  void (*entry_)(const void*) = nullptr;
  const void* args_ = nullptr;
  void (*tls_entry_)(const void*) = nullptr;
  TlsBlock tls_;
  uint64_t poisoned_launch_ = 0;
};

thread_local BlockRunner* t_runner = nullptr;
thread_local std::unique_ptr<BlockRunner> t_owned_runner;  // one per OS thread, kept for reuse

// The calling thread's copy of the thread-local storage of the module (shared library or program)
// whose code holds `address`; empty if it has none.
TlsBlock module_tls(const void* address) {
  struct Search {
    uintptr_t address;
    TlsBlock found;
  } search{reinterpret_cast<uintptr_t>(address), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* p) -> int {
        auto& s = *static_cast<Search*>(p);
        bool contains = false;
        size_t tls_size = 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr) & ph = info->dlpi_phdr[i];
          const uintptr_t start = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && s.address >= start && s.address < start + ph.p_memsz)
            contains = true;
          if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
        }
        if (!contains) return 0;
        if (info->dlpi_tls_data != nullptr && tls_size > 0)
          s.found = {static_cast<char*>(info->dlpi_tls_data), tls_size};
        return 1;
      },
      &search);
  return search.found;
}

// Fills the __shared__ variables of a kernel's module with 0xFF bytes (NaN floats, all-ones
// integers), as a GPU's shared memory holds whatever was there before: a kernel that reads shared
// memory before a barrier makes it valid then reads poison, not a value that an earlier launch
// left on this OS thread. Done at the first block of each launch on each OS thread (within a
// launch, a block sees what the previous one left, often different data). __shared__ variables
// are that module's thread-locals, except the emulator's own, which are skipped.
void poison_shared_memory(const TlsBlock& tls) {
  struct Span {
    const void* p;
    size_t size;
  };
  const Span keep[] = {{&current_thread, sizeof(current_thread)},
                       {&t_runner, sizeof(t_runner)},
                       {&t_owned_runner, sizeof(t_owned_runner)}};
  char* const end = tls.data + tls.size;
  char* from = tls.data;
  while (from < end) {
    char* to = end;
    const Span* next = nullptr;
    for (const Span& k : keep) {
      char* const at = static_cast<char*>(const_cast<void*>(k.p));
      if (at + k.size > from && at < to) {
        to = at < from ? from : at;
        next = &k;
      }
    }
    std::memset(from, 0xFF, static_cast<size_t>(to - from));
    if (next == nullptr) break;
    from = static_cast<char*>(const_cast<void*>(next->p)) + next->size;
  }
}

BlockRunner& runner_in_fiber() {
  if (t_runner == nullptr || current_thread == nullptr)
    throw KernelError("cuda emulation: a device function was called outside a kernel launch");
  return *t_runner;
}

void BlockRunner::fiber_main() {
  BlockRunner& r = *t_runner;
  r.entry_(r.args_);
  r.fibers_[r.current_].state = State::kExited;
  switch_context(r.fibers_[r.current_].context, r.scheduler_);
  __builtin_unreachable();  // an exited fiber is never switched to again
}

std::string BlockRunner::lane_name(int thread) const {
  return "thread " + std::to_string(thread) + " (warp " + std::to_string(thread / 32) + " lane " +
         std::to_string(thread % 32) + ")";
}

void BlockRunner::fail(const std::string& message) const {
  std::ostringstream s;
  s << kernel_ << " block (" << block_idx_.x << "," << block_idx_.y << "," << block_idx_.z
    << "): " << message;
  throw KernelError(s.str());
}

// The fiber stops for good; the scheduler reports the error once it is back on its own stack.
void BlockRunner::fail_in_fiber(const std::string& message) {
  error_ = message;
  switch_context(fibers_[current_].context, scheduler_);
  __builtin_unreachable();
}

void BlockRunner::wait(State state, const std::source_location& where) {
  Fiber& f = fibers_[current_];
  f.state = state;
  f.where = where;
  switch_context(f.context, scheduler_);
}

void BlockRunner::wait_at_barrier(const std::source_location& where) {
  wait(State::kBarrier, where);
}

uint64_t BlockRunner::wait_at_shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_arg,
                                      int width, const std::source_location& where) {
  const int lane = current_ % 32;
  if (!(mask >> lane & 1u))
    fail_in_fiber(lane_name(current_) + " calls " + shuffle_name(kind) + " (" + site(where) +
                  ") with mask 0x" +
                  [&] {
                    std::ostringstream h;
                    h << std::hex << mask;
                    return h.str();
                  }() +
                  ", which leaves itself out");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail_in_fiber(lane_name(current_) + " calls " + shuffle_name(kind) + " (" + site(where) +
                  ") with width " + std::to_string(width) + ", not a power of 2 up to 32");
  Fiber& f = fibers_[current_];
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.lane_arg = lane_arg;
  f.width = width;
  wait(State::kShuffle, where);
  return f.value;
}

// Resolves the shuffles of a warp none of whose lanes is ready: each mask's lanes must all wait at
// the same shuffle, since a lane that waits at a barrier or has returned never will arrive.
// Returns whether any lane was released.
bool BlockRunner::resolve_shuffles(int warp) {
  const int first = warp * 32;
  const int lanes = count_ - first < 32 ? count_ - first : 32;
  bool any = false;
  uint32_t checked = 0;  // lanes of a group already checked: every member agrees with them
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = fibers_[first + l];
    if (f.state != State::kShuffle) continue;
    any = true;
    if (checked >> l & 1u) continue;
    checked |= f.mask;
    for (int j = 0; j < 32; ++j) {
      if (!(f.mask >> j & 1u)) continue;
      if (j >= lanes)
        fail(lane_name(first + l) + " at " + shuffle_name(f.kind) + " (" + site(f.where) +
             ") names lane " + std::to_string(j) + ", which this block does not have");
      const Fiber& g = fibers_[first + j];
      if (g.state != State::kShuffle || g.mask != f.mask || g.kind != f.kind ||
          g.where.line() != f.where.line() || g.width != f.width)
        fail(lane_name(first + l) + " waits at " + shuffle_name(f.kind) + " (" + site(f.where) +
             ") for lane " + std::to_string(j) + ", which " +
             (g.state == State::kShuffle
                  ? "waits at a different shuffle or mask, " + std::string(shuffle_name(g.kind)) +
                        " (" + site(g.where) + ")"
                  : describe(g)));
    }
  }
  if (!any) return false;
  uint64_t result[32];
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = fibers_[first + l];
    if (f.state != State::kShuffle) continue;
    const int segment = l / f.width * f.width;  // first lane of this lane's width-sized group
    int src = l;
    switch (f.kind) {
      case ShuffleKind::kIdx:
        src = segment + ((f.lane_arg % f.width) + f.width) % f.width;
        break;
      case ShuffleKind::kUp:
        src = l - f.lane_arg >= segment ? l - f.lane_arg : l;
        break;
      case ShuffleKind::kDown:
        src = l + f.lane_arg < segment + f.width ? l + f.lane_arg : l;
        break;
      case ShuffleKind::kXor:
        src = l ^ f.lane_arg;
        if (src < segment || src >= segment + f.width || src >= 32) src = l;
        break;
    }
    if (!(f.mask >> src & 1u))
      fail(lane_name(first + l) + " at " + shuffle_name(f.kind) + " (" + site(f.where) +
           ") reads lane " + std::to_string(src) + ", which is outside the mask");
    result[l] = fibers_[first + src].value;
  }
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = fibers_[first + l];
    if (f.state != State::kShuffle) continue;
    f.value = result[l];
    f.state = State::kReady;
  }
  return true;
}

void BlockRunner::resolve_barrier() {
  int first_waiting = -1;
  for (int t = 0; t < count_; ++t) {
    const Fiber& f = fibers_[t];
    if (f.state != State::kBarrier) continue;
    if (first_waiting < 0) {
      first_waiting = t;
      continue;
    }
    const Fiber& w = fibers_[first_waiting];
    if (f.where.line() != w.where.line() || std::strcmp(f.where.file_name(), w.where.file_name()))
      fail("divergent __syncthreads: " + lane_name(first_waiting) + " waits at " + site(w.where) +
           ", " + lane_name(t) + " at " + site(f.where));
  }
  for (int t = 0; t < count_; ++t)
    if (fibers_[t].state == State::kBarrier) fibers_[t].state = State::kReady;
}

void BlockRunner::run(uint64_t launch, const char* kernel, uint3 block_idx, dim3 grid, dim3 block,
                      void (*entry)(const void*), const void* args) {
  kernel_ = kernel;
  block_idx_ = block_idx;
  entry_ = entry;
  args_ = args;
  error_.clear();
  count_ = static_cast<int>(block.x * block.y * block.z);
  for (int t = 0; t < count_; ++t) {
    Fiber& f = fibers_[t];
    const auto u = static_cast<unsigned>(t);
    f.index = {
        {u % block.x, u / block.x % block.y, u / (block.x * block.y)}, block_idx, block, grid};
    f.state = State::kReady;
    init_context(f.context, stacks_.stack(t), kStackBytes, &fiber_main);
  }
  if (launch != poisoned_launch_) {  // a block's first on this OS thread in this launch
    poisoned_launch_ = launch;
    if (entry != tls_entry_) {  // one search per kernel and OS thread: the storage stays put
      tls_entry_ = entry;
      tls_ = module_tls(reinterpret_cast<const void*>(entry));
    }
    poison_shared_memory(tls_);
  }
  t_runner = this;
  for (;;) {
    for (int warp = 0; warp * 32 < count_; ++warp) run_warp(warp);
    bool waiting = false;
    for (int t = 0; t < count_; ++t) waiting |= fibers_[t].state != State::kExited;
    if (!waiting) return;
    resolve_barrier();
  }
}

// Runs a warp's lanes, and its shuffles as they complete, until every lane waits at a barrier or
// has returned. A warp thus runs ahead of the later warps up to the next barrier, as it may on a
// GPU: a missing barrier shows up as a read of shared memory a later warp has not written yet.
void BlockRunner::run_warp(int warp) {
  const int first = warp * 32;
  const int last = count_ < first + 32 ? count_ : first + 32;
  do {
    for (int t = first; t < last; ++t) {
      Fiber& f = fibers_[t];
      if (f.state != State::kReady) continue;
      current_ = t;
      current_thread = &f.index;
      switch_context(scheduler_, f.context);
      current_thread = nullptr;
      if (!error_.empty()) fail(error_);
    }
  } while (resolve_shuffles(warp));
}

void check_shape(const char* kernel, dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  std::ostringstream s;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > kMaxThreadsPerBlock ||
      block.x > kMaxBlockXY || block.y > kMaxBlockXY || block.z > kMaxBlockZ)
    s << "block (" << block.x << "," << block.y << "," << block.z << ") has " << threads
      << " threads; CUDA allows 1 to 1024 (x, y <= 1024, z <= 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ ||
           grid.z > kMaxGridYZ)
    s << "grid (" << grid.x << "," << grid.y << "," << grid.z
      << ") is outside CUDA's limits (x < 2^31, y and z <= 65535, none 0)";
  else
    return;
  throw KernelError(std::string(kernel) + ": invalid launch: " + s.str());
}

}  // namespace

void sync_block(const std::source_location& where) { runner_in_fiber().wait_at_barrier(where); }

uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_arg, int width,
                 const std::source_location& where) {
  return runner_in_fiber().wait_at_shuffle(kind, mask, value, lane_arg, width, where);
}

void run_grid(const char* kernel, dim3 grid, dim3 block, void (*entry)(const void*),
              const void* args) {
  check_shape(kernel, grid, block);
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  static std::atomic<uint64_t> launches{0};
  const uint64_t launch = ++launches;
  std::mutex mutex;
  std::string error;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic)
  for (int64_t b = 0; b < blocks; ++b) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      if (!t_owned_runner) t_owned_runner = std::make_unique<BlockRunner>();
      const auto u = static_cast<uint64_t>(b);
      const uint3 idx{static_cast<unsigned>(u % grid.x), static_cast<unsigned>(u / grid.x % grid.y),
                      static_cast<unsigned>(u / (uint64_t{grid.x} * grid.y))};
      t_owned_runner->run(launch, kernel, idx, grid, block, entry, args);
    } catch (const std::exception& e) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!failed.exchange(true)) error = e.what();
    }
  }
  if (failed) throw KernelError(error);
}

}  // namespace lorakit::emu
