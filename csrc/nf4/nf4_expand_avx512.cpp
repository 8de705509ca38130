#include "nf4/nf4_avx512.h"
#include "nf4/nf4_expand.h"

namespace lorakit::nf4 {
namespace {

void expand4(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks, const uint32_t* tables,
             uint32_t* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i table = _mm512_loadu_si512(tables + 16 * b);
    const uint8_t* src = packed + b * bytes_per_block;
    uint32_t* dst = out + b * bytes_per_block * 2;
    for (int64_t i = 0; i < bytes_per_block; i += 16) {
      __m128i first, second;
      nibbles32(src + i, first, second);
      _mm512_storeu_si512(dst + 2 * i, _mm512_permutexvar_epi32(widen32(first), table));
      _mm512_storeu_si512(dst + 2 * i + 16, _mm512_permutexvar_epi32(widen32(second), table));
    }
  }
}

void expand2(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks, const uint16_t* tables,
             uint16_t* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    // Indices stay below 16, so the permute never reads the register's undefined upper half.
    const __m512i table = _mm512_castsi256_si512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tables + 16 * b)));
    const uint8_t* src = packed + b * bytes_per_block;
    uint16_t* dst = out + b * bytes_per_block * 2;
    for (int64_t i = 0; i < bytes_per_block; i += 16) {
      __m128i first, second;
      nibbles32(src + i, first, second);
      _mm512_storeu_si512(dst + 2 * i, _mm512_permutexvar_epi16(widen16(first, second), table));
    }
  }
}

}  // namespace

void expand_nibbles_avx512(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                           const void* tables, int width, void* out) {
  if (width == 2) {
    expand2(packed, bytes_per_block, blocks, static_cast<const uint16_t*>(tables),
            static_cast<uint16_t*>(out));
  } else {
    expand4(packed, bytes_per_block, blocks, static_cast<const uint32_t*>(tables),
            static_cast<uint32_t*>(out));
  }
}

}  // namespace lorakit::nf4
