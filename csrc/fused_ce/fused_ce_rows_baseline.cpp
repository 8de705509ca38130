// The fused cross-entropy row kernel compiled for baseline x86-64. Includes no torch headers.
#define LORAKIT_FUSED_CE_ISA baseline
#include "fused_ce/fused_ce_rows_impl.h"
