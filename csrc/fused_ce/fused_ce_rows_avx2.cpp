// The fused cross-entropy row kernel compiled for AVX2 + FMA + F16C (see CMakeLists.txt). Includes
// no torch headers.
#define LORAKIT_FUSED_CE_ISA avx2
#include "fused_ce/fused_ce_rows_impl.h"
