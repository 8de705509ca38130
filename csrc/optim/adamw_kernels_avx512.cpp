// The AdamW CPU kernels compiled for AVX-512 (see CMakeLists.txt). Includes no torch headers.
#define LORAKIT_OPTIM_ISA avx512
#include "optim/adamw_kernels_impl.h"
