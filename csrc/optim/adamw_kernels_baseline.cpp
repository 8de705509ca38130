// The AdamW CPU kernels compiled for baseline. Includes no torch headers.
#define LORAKIT_OPTIM_ISA baseline
#include "optim/adamw_kernels_impl.h"
