// The fused cross-entropy row kernel compiled for AVX-512 (see CMakeLists.txt). Includes no torch
// headers.
#define LORAKIT_FUSED_CE_ISA avx512
#include "fused_ce/fused_ce_rows_impl.h"
