// The fused cross-entropy row kernel compiled for baseline x86-64. Includes no torch headers.
#define LORAKIT_FUSED_CE_ISA baseline
#include "fused_ce/fused_ce_rows_impl.h"

namespace lorakit::fused_ce {

// Here, not in the AVX2 copy: this must run on any CPU.
bool cpu_has_avx2_fma_f16c() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace lorakit::fused_ce
