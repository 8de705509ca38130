#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace lorakit {
namespace {

constexpr const char* kNames[kCpuIsaLevels] = {"scalar", "avx2", "avx512", "avx512_bf16"};

CpuIsa detect() {
#ifdef LORAKIT_SIMDE_AVX512
  // A verification build: the AVX-512 kernels are compiled against SIMDe's portable
  // implementation of the intrinsics, so every level runs on any CPU.
  return CpuIsa::kAvx512Bf16;
#elif !defined(LORAKIT_HAVE_X86_KERNELS)
  // The portable copies are all this build has (and, off x86, there is no __builtin_cpu_supports
  // for the x86 features).
  return CpuIsa::kScalar;
#else
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")))
    return CpuIsa::kScalar;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return CpuIsa::kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512;
  return CpuIsa::kAvx512Bf16;
#endif
}

CpuIsa choose() {
  const CpuIsa detected = detect();
  const char* forced = std::getenv("LORAKIT_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return detected;
  for (int level = 0; level < kCpuIsaLevels; ++level) {
    if (std::strcmp(forced, kNames[level]) != 0) continue;
    TORCH_CHECK_VALUE(have_x86_kernels() || level == 0, "LORAKIT_CPU_ISA=", forced,
                      " asks for more than this build has (it has only the portable scalar "
                      "kernels)");
    TORCH_CHECK_VALUE(level <= static_cast<int>(detected), "LORAKIT_CPU_ISA=", forced,
                      " asks for more than this CPU has (it supports up to ",
                      kNames[static_cast<int>(detected)], ")");
    return static_cast<CpuIsa>(level);
  }
  std::string known;
  for (const char* name : kNames) known += std::string(known.empty() ? "" : ", ") + name;
  TORCH_CHECK_VALUE(false, "LORAKIT_CPU_ISA='", forced, "' is no level; use one of ", known);
}

}  // namespace

CpuIsa detected_cpu_isa() {
  static const CpuIsa detected = detect();
  return detected;
}

CpuIsa cpu_isa() {
  static const CpuIsa chosen = choose();  // a throw leaves it unset: the next call throws again
  return chosen;
}

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

bool avx512_on_simde() {
#ifdef LORAKIT_SIMDE_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace lorakit
