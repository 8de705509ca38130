// The x86 intrinsics for a kernel translation unit: the compiler's own, or, in a verification
// build (LORAKIT_SIMDE, see CMakeLists.txt), SIMDe's portable implementation of the same names,
// so that kernels for an instruction set this CPU lacks still run, slowly, under the tests.
#pragma once

#ifdef LORAKIT_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif
