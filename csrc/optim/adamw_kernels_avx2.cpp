// The AdamW CPU kernels compiled for avx2 (with FMA and F16C; see CMakeLists.txt). Includes no
// torch headers.
#define LORAKIT_OPTIM_ISA avx2
#include "optim/adamw_kernels_impl.h"
