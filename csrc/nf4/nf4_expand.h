// Table-lookup expansion of packed nibbles, one copy per instruction-set level, each compiled in
// its own translation unit that includes no torch headers (see CMakeLists.txt); the caller picks
// one with cpu_isa().
#pragma once

#include <cstdint>

namespace lorakit::nf4 {

// For each of `blocks` blocks: expands `bytes_per_block` packed bytes (a multiple of 16; high
// nibble first) into 2 * bytes_per_block output values looked up in that block's 16-entry table.
// tables: blocks * 16 values of `width` bytes (2 or 4); out: blocks * 2 * bytes_per_block values.
using ExpandNibbles = void (*)(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                               const void* tables, int width, void* out);

// SSSE3 byte shuffles, one 16-byte table per byte of the value.
void expand_nibbles_avx2(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                         const void* tables, int width, void* out);
// AVX-512 permutes: the whole 16-entry table in one register.
void expand_nibbles_avx512(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                           const void* tables, int width, void* out);

}  // namespace lorakit::nf4
