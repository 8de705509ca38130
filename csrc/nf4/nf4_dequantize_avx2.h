// Table-lookup expansion of packed nibbles with SSSE3 byte shuffles. Compiled for AVX2 in its own
// translation unit that includes no torch headers, so no AVX2 copy of a shared inline function can
// leak into code that runs on older CPUs; call only when cpu_has_avx2() says so.
#pragma once

#include <cstdint>

namespace lorakit::nf4 {

bool cpu_has_avx2();

// For each of `blocks` blocks: expands `bytes_per_block` packed bytes (a multiple of 16; high
// nibble first) into 2 * bytes_per_block output values looked up in that block's 16-entry table.
// tables: blocks * 16 values of `width` bytes (2 or 4); out: blocks * 2 * bytes_per_block values.
void expand_nibbles_avx2(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                         const void* tables, int width, void* out);

}  // namespace lorakit::nf4
