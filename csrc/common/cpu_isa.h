// The instruction-set level lorakit's CPU kernels run at, picked once per process the way ATen's
// CPU capability dispatch does: the highest level this CPU (and its OS) supports, or a lower one
// forced with LORAKIT_CPU_ISA so that every kernel variant can be tested on one machine.
// Torch-free, compiled for baseline x86-64: it must run on CPUs that have none of the levels.
// Other CPUs (aarch64 ...) and builds with LORAKIT_X86_KERNELS=OFF have the scalar level only:
// LORAKIT_HAVE_X86_KERNELS is then unset and the x86 copies are not compiled.
#pragma once

namespace lorakit {

// Ordered: each level includes the ones below it.
//   kScalar:     portable C++ (baseline x86-64, SSE2; any other CPU)
//   kAvx2:       AVX2 + FMA + F16C
//   kAvx512:     AVX-512 F, BW, VL and DQ
//   kAvx512Bf16: kAvx512 + AVX512_BF16 (bf16 dot products)
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kCpuIsaLevels = 4;

// The highest level this CPU supports.
CpuIsa detected_cpu_isa();

// The level kernels use: detected_cpu_isa(), or LORAKIT_CPU_ISA when set. Read once; an unknown
// name or a level above the detected one raises a ValueError naming the variable (every call
// does, so the mistake is never silently replaced by a default).
CpuIsa cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

// Whether this is a verification build whose AVX-512 kernels run on SIMDe (see CMakeLists.txt):
// detected_cpu_isa() then reports every level, whatever the CPU.
bool avx512_on_simde();

// Whether this build has the x86 copies of the kernels (the levels above kScalar).
constexpr bool have_x86_kernels() {
#ifdef LORAKIT_HAVE_X86_KERNELS
  return true;
#else
  return false;
#endif
}

// An x86 copy of a kernel (a function name) where the build has them, else a null pointer of its
// type: the name is then never odr-used, so nothing links against the copy that was not compiled,
// and cpu_isa() is kScalar, so no caller reaches the null.
#ifdef LORAKIT_HAVE_X86_KERNELS
#define LORAKIT_X86_KERNEL(name) (&(name))
#else
#define LORAKIT_X86_KERNEL(name) static_cast<decltype(&(name))>(nullptr)
#endif

// Of a kernel's copies for the scalar, AVX2 and AVX-512 levels, the one for cpu_isa(); the x86
// ones passed through LORAKIT_X86_KERNEL.
template <typename Kernel>
Kernel kernel_for_cpu_isa(Kernel scalar, Kernel avx2, Kernel avx512) {
  const CpuIsa isa = cpu_isa();
  return isa >= CpuIsa::kAvx512 ? avx512 : isa >= CpuIsa::kAvx2 ? avx2 : scalar;
}

}  // namespace lorakit
