#include <immintrin.h>

#include "nf4/nf4_expand.h"

namespace lorakit::nf4 {
namespace {

// Splits 16 nibble indices into the bytes of the looked-up values. A value of W bytes is the
// concatenation of W byte-tables, each gathered with one pshufb.
template <int W>
inline void lookup16(__m128i idx, const __m128i* byte_tables, uint8_t* out) {
  if constexpr (W == 2) {
    const __m128i lo = _mm_shuffle_epi8(byte_tables[0], idx);
    const __m128i hi = _mm_shuffle_epi8(byte_tables[1], idx);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi8(lo, hi));
  } else {
    const __m128i b0 = _mm_shuffle_epi8(byte_tables[0], idx);
    const __m128i b1 = _mm_shuffle_epi8(byte_tables[1], idx);
    const __m128i b2 = _mm_shuffle_epi8(byte_tables[2], idx);
    const __m128i b3 = _mm_shuffle_epi8(byte_tables[3], idx);
    const __m128i lo01 = _mm_unpacklo_epi8(b0, b1), hi01 = _mm_unpackhi_epi8(b0, b1);
    const __m128i lo23 = _mm_unpacklo_epi8(b2, b3), hi23 = _mm_unpackhi_epi8(b2, b3);
    auto* o = reinterpret_cast<__m128i*>(out);
    _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(lo01, lo23));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(lo01, lo23));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(hi01, hi23));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(hi01, hi23));
  }
}

template <int W>
void expand(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks, const uint8_t* tables,
            uint8_t* out) {
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    // Transpose the 16 x W-byte table into W tables of 16 bytes.
    alignas(16) uint8_t split[W][16];
    const uint8_t* table = tables + b * 16 * W;
    for (int j = 0; j < 16; ++j)
      for (int k = 0; k < W; ++k) split[k][j] = table[j * W + k];
    __m128i byte_tables[W];
    for (int k = 0; k < W; ++k)
      byte_tables[k] = _mm_load_si128(reinterpret_cast<__m128i*>(split[k]));

    const uint8_t* src = packed + b * bytes_per_block;
    uint8_t* dst = out + b * bytes_per_block * 2 * W;
    for (int64_t i = 0; i < bytes_per_block; i += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low_nibble);
      const __m128i lo = _mm_and_si128(v, low_nibble);
      // Element 2p is byte p's high nibble, element 2p+1 its low nibble.
      lookup16<W>(_mm_unpacklo_epi8(hi, lo), byte_tables, dst + i * 2 * W);
      lookup16<W>(_mm_unpackhi_epi8(hi, lo), byte_tables, dst + i * 2 * W + 16 * W);
    }
  }
}

}  // namespace

void expand_nibbles_avx2(const uint8_t* packed, int64_t bytes_per_block, int64_t blocks,
                         const void* tables, int width, void* out) {
  const auto* t = static_cast<const uint8_t*>(tables);
  auto* o = static_cast<uint8_t*>(out);
  if (width == 2) {
    expand<2>(packed, bytes_per_block, blocks, t, o);
  } else {
    expand<4>(packed, bytes_per_block, blocks, t, o);
  }
}

}  // namespace lorakit::nf4
