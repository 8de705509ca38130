// The CUDA execution model on the CPU, so that the device code in csrc/**/*.cuh runs (and is
// tested) on machines without a GPU. Include this header, then a *.cuh, in a file compiled by the
// host compiler with -ffp-contract=off (so a * b + c rounds twice, like the __fmul_rn / __fadd_rn
// it stands for) and -fno-strict-aliasing (kernels reinterpret bytes as words and vectors).
//
// What it models:
//  - every CUDA thread of a block is a user-space fiber (cuda_emulation.cpp); a block's fibers run
//    on one OS thread, warp after warp, each warp up to its next barrier (so it runs ahead of the
//    later warps, as it may on a GPU); blocks run in parallel on the OpenMP threads;
//  - threadIdx / blockIdx / blockDim / gridDim are the running fiber's;
//  - __shared__ variables are `static thread_local`: one copy per OS thread, which is one per block
//    in flight, filled with 0xFF bytes (NaN) at each launch; __constant__ variables are globals;
//  - __syncthreads() waits for every thread of the block that has not returned (returned threads
//    count as arrived, as on sm_70 and later); threads waiting at different __syncthreads() call
//    sites are an error;
//  - warp shuffles exchange values among the lanes named in `mask`; a lane that calls with a mask
//    leaving itself out, a named lane that returned, waits elsewhere or names another mask, and a
//    read from a lane outside the mask are errors;
//  - a launch copies its arguments by value (each thread gets its own copy) and checks the block
//    and grid shapes against CUDA's limits. Launches take no dynamic shared memory (no kernel
//    here uses it); static __shared__ use above 48 KB is already a ptxas error in the nvcc build.
// An error (or a block that can never finish) stops the launch: emu::Launch throws KernelError,
// naming the kernel and the block. It never hangs, except in a kernel that itself loops forever.
//
// What it does not model: timing, memory coalescing, occupancy, caches, races that need two
// threads to run at the same moment (a missing barrier shows only when a warp reads what a later
// warp has not written yet), and the GPU's own rounding where the compiler contracts a * b + c
// into one FMA (the host here never does).
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) uint2 {
  unsigned x, y;
};

constexpr int warpSize = 32;

namespace lorakit::emu {

// The CUDA thread that runs now on this OS thread.
struct ThreadIndex {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local const ThreadIndex* current_thread = nullptr;

class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs the grid: entry(args) once per CUDA thread. Throws KernelError.
void run_grid(const char* kernel, dim3 grid, dim3 block, void (*entry)(const void*),
              const void* args);

void sync_block(const std::source_location& where);

enum class ShuffleKind { kIdx, kUp, kDown, kXor };
uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_arg, int width,
                 const std::source_location& where);

template <typename T>
T shuffle_value(ShuffleKind kind, unsigned mask, T var, int lane_arg, int width,
                const std::source_location& where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4 or 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(kind, mask, bits, lane_arg, width, where);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

// The launch policy that the launchers in the *.cuh headers take (StreamLaunch under nvcc).
struct Launch {
  template <typename... Params, typename... Args>
  void operator()(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                  Args&&... args) const {
    struct Bound {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;  // converted as <<<>>> converts them
    };
    const Bound bound{kernel, {std::forward<Args>(args)...}};
    // Each thread calls the kernel with its own copy of the parameters, which it may modify.
    run_grid(
        name, grid, block,
        [](const void* p) {
          const Bound& b = *static_cast<const Bound*>(p);
          std::apply(b.kernel, b.params);
        },
        &bound);
  }
};

}  // namespace lorakit::emu

#define threadIdx (::lorakit::emu::current_thread->thread_idx)
#define blockIdx (::lorakit::emu::current_thread->block_idx)
#define blockDim (::lorakit::emu::current_thread->block_dim)
#define gridDim (::lorakit::emu::current_thread->grid_dim)

// ---- synchronisation ----------------------------------------------------------------------------

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  lorakit::emu::sync_block(where);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location where = std::source_location::current()) {
  return lorakit::emu::shuffle_value(lorakit::emu::ShuffleKind::kIdx, mask, var, src_lane, width,
                                     where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location where = std::source_location::current()) {
  return lorakit::emu::shuffle_value(lorakit::emu::ShuffleKind::kUp, mask, var,
                                     static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location where = std::source_location::current()) {
  return lorakit::emu::shuffle_value(lorakit::emu::ShuffleKind::kDown, mask, var,
                                     static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location where = std::source_location::current()) {
  return lorakit::emu::shuffle_value(lorakit::emu::ShuffleKind::kXor, mask, var, lane_mask, width,
                                     where);
}

// ---- atomics: real atomics, since blocks run on several OS threads ------------------------------

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicMax(T* address, T value) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMax takes integers");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

// ---- intrinsics
// -----------------------------------------------------------------------------------

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }

// IEEE round-to-nearest operations; the host rounds each one alike as long as the file is compiled
// with -ffp-contract=off.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// CUDA's integer min / max overloads (device code calls them unqualified).
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }

// ---- half and bfloat16 (cuda_fp16.h / cuda_bf16.h): round to nearest even, as the GPU converts --

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | mantissa << 13);
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | (exponent + 112) << 23 | mantissa << 13);
}

inline __half __float2half(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u)};   // NaN
  if (magnitude >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a half subnormal, rounded in float arithmetic
    // |f| + 0.5 keeps 2^-24 as the unit of the last place, so the add rounds to nearest even.
    const float shifted = std::bit_cast<float>(magnitude) + 0.5f;
    return {static_cast<uint16_t>(sign | (std::bit_cast<uint32_t>(shifted) - 0x3F000000u))};
  }
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to nearest even.
  const uint32_t odd = (magnitude >> 13) & 1u;
  const uint32_t rounded = magnitude + 0xFFFu + odd - (112u << 23);
  return {static_cast<uint16_t>(sign | (rounded >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // NaN
  return {static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}
