#include <immintrin.h>

#include <cstring>

#include "lora/nf4_code_bf16.h"
#include "lora/nf4_gemv.h"
#include "lora/nf4_gemv_rows.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {

namespace {

// The 32 4-bit indices of 16 packed bytes, one per byte: the high nibbles (even elements) in the
// low lane, the low nibbles (odd elements) in the high one. The bytes are broadcast to both lanes
// by the load itself; shifting the low lane's dwords right by 4 brings each byte's high nibble
// down, and the mask drops the bits shifted in from the byte above. No byte shuffle.
inline __m256i nibble_indices(const uint8_t* bytes) {
  const __m256i b =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i shifted = _mm256_srlv_epi32(b, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

// The NF4 table as float32, cut into byte planes: plane j holds byte j of each of the 16 codes,
// in both 128-bit lanes, so that one byte shuffle looks up that byte for 32 codes at once.
struct ExactCodes {
  __m256i plane[4];

  ExactCodes() {
    alignas(32) uint8_t bytes[4][32];
    for (int i = 0; i < 16; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &nf4::kCode[i], sizeof bits);
      for (int j = 0; j < 4; ++j) bytes[j][i] = bytes[j][16 + i] = (bits >> (8 * j)) & 0xFF;
    }
    for (int j = 0; j < 4; ++j)
      plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  }

  // Four shuffles and eight in-lane unpacks per 32 weights, against four lane-crossing permutes
  // and two blends per 16 with an 8-entry float table: a 2048 x 2048 product took about 420
  // instead of 610 us on one Zen 3 core. The unpacks leave vector v holding elements
  // 8v + (0, 2, 4, 6, 1, 3, 5, 7): the order order_for_gemv gives x.
  void decode32(const uint8_t* bytes, __m256 w[4]) const {
    const __m256i idx = nibble_indices(bytes);
    __m256i p[4];
    for (int j = 0; j < 4; ++j) p[j] = _mm256_shuffle_epi8(plane[j], idx);
    const __m256i lo01 = _mm256_unpacklo_epi8(p[0], p[1]);
    const __m256i hi01 = _mm256_unpackhi_epi8(p[0], p[1]);
    const __m256i lo23 = _mm256_unpacklo_epi8(p[2], p[3]);
    const __m256i hi23 = _mm256_unpackhi_epi8(p[2], p[3]);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  }
};

// The NF4 table rounded to bfloat16, as its low and high bytes in both lanes.
struct Bf16Codes {
  __m256i low, high;

  Bf16Codes() {
    alignas(32) uint8_t bytes[2][32];
    for (int i = 0; i < 16; ++i) {
      const uint16_t bits = kCodeBf16Bits[i];
      bytes[0][i] = bytes[0][16 + i] = bits & 0xFF;
      bytes[1][i] = bytes[1][16 + i] = bits >> 8;
    }
    low = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[0]));
    high = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[1]));
  }

  // Two shuffles and two unpacks give the 32 codes as 16-bit pairs; a bfloat16 is the top half
  // of its float32, so a shift and a mask widen each pair's two halves: 4 shuffle-port operations
  // per 32 weights instead of 12. Vector v holds elements 16 (v / 2) + 4 (l % 4) + 2 (v % 2) +
  // l / 4 in lane l: the order order_for_gemv_bf16 gives x.
  void decode32(const uint8_t* bytes, __m256 w[4]) const {
    const __m256i idx = nibble_indices(bytes);
    const __m256i lo = _mm256_shuffle_epi8(low, idx);
    const __m256i hi = _mm256_shuffle_epi8(high, idx);
    const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m256i pairs[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
    for (int h = 0; h < 2; ++h) {
      w[2 * h] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs[h], 16));
      w[2 * h + 1] = _mm256_castsi256_ps(_mm256_and_si256(pairs[h], top));
    }
  }
};

// The vector type of nf4_gemv_rows.h, decoding with CodeTable (ExactCodes or Bf16Codes).
template <typename CodeTable>
struct Avx2 {
  using Reg = __m256;
  using Codes = CodeTable;
  static constexpr int kVectors = 4;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float f) { return _mm256_set1_ps(f); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void decode32(const uint8_t* bytes, const Codes& codes, Reg w[4]) {
    codes.decode32(bytes, w);
  }
  static float sum(Reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace

void nf4_gemv_avx2(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy) {
  gemv<Avx2<ExactCodes>>(packed, scales, ExactCodes(), blocksize, in, x, m, row_begin, row_end, y,
                         ldy);
}

void nf4_gemv_avx2_bf16(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                        int64_t in, const float* x, int64_t m, int64_t row_begin, int64_t row_end,
                        float* y, int64_t ldy) {
  gemv<Avx2<Bf16Codes>>(packed, scales, Bf16Codes(), blocksize, in, x, m, row_begin, row_end, y,
                        ldy);
}

void order_for_gemv(const float* src, int64_t n, float* dst) {
  for (int64_t g = 0; g < n; g += 8)
    for (int p = 0; p < 4; ++p) {
      dst[g + p] = src[g + 2 * p];
      dst[g + 4 + p] = src[g + 2 * p + 1];
    }
}

void order_for_gemv_bf16(const float* src, int64_t n, float* dst) {
  for (int64_t g = 0; g < n; g += 32)
    for (int v = 0; v < 4; ++v)
      for (int l = 0; l < 8; ++l)
        dst[g + 8 * v + l] = src[g + 16 * (v / 2) + 4 * (l % 4) + 2 * (v % 2) + l / 4];
}

}  // namespace lorakit::lora
