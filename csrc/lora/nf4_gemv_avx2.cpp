#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "lora/gemv_row_passes.h"
#include "lora/nf4_gemv.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {

namespace {

// The NF4 table cut into byte planes: plane j holds byte j of each of the 16 float32 codes, in
// both 128-bit lanes, so that one byte shuffle looks up that byte for 32 codes at once.
struct CodePlanes {
  __m256i plane[4];

  CodePlanes() {
    alignas(32) uint8_t bytes[4][32];
    for (int i = 0; i < 16; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &nf4::kCode[i], sizeof bits);
      for (int j = 0; j < 4; ++j) bytes[j][i] = bytes[j][16 + i] = (bits >> (8 * j)) & 0xFF;
    }
    for (int j = 0; j < 4; ++j)
      plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  }
};

// The unscaled codes of the 32 weights in 16 packed bytes, as four vectors of 8 floats. The
// high nibbles (even elements) go to the low lane and the low nibbles (odd elements) to the high
// one; the byte then 16-bit unpacks, which work within lanes, leave vector v holding elements
// 8v + (0, 2, 4, 6, 1, 3, 5, 7): the order order_for_gemv gives x. Four shuffles and eight
// in-lane unpacks per 32 weights, against four lane-crossing permutes and two blends per 16 with
// an 8-entry float table: a 2048 x 2048 product took about 420 instead of 610 us on one Zen 3
// core.
inline void decode32(const uint8_t* bytes, const CodePlanes& codes, __m256 w[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256i idx =
      _mm256_set_m128i(_mm_and_si128(b, nibble), _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
  __m256i p[4];
  for (int j = 0; j < 4; ++j) p[j] = _mm256_shuffle_epi8(codes.plane[j], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(p[0], p[1]), hi01 = _mm256_unpackhi_epi8(p[0], p[1]);
  const __m256i lo23 = _mm256_unpacklo_epi8(p[2], p[3]), hi23 = _mm256_unpackhi_epi8(p[2], p[3]);
  w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// M input rows at once, so each group of 32 weights is decoded once for all of them. Below 8
// rows, two accumulator sets keep two FMA chains in flight per row. The scale goes either on each
// block's sums (kScaleSums) or on the decoded weights. One or two rows are bound by the shuffles,
// where the former saves the multiplies; more rows by the FMAs, where it costs a second set of
// accumulators. 2048 x 2048 on one Zen 3 core, sums against weights: 1 row 430 / 490 us, 2 rows
// 525 / 565, 4 rows 775 / 750, 8 rows 1630 / 1485.
template <int M>
void gemv_rows(const uint8_t* packed, const BlockScales& scales, const CodePlanes& codes, int shift,
               int64_t in, const float* x, int64_t row_begin, int64_t row_end, float* y,
               int64_t ldy) {
  constexpr int kSets = M >= 8 ? 1 : 2;
  constexpr bool kScaleSums = M <= 2;
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m256 acc[kSets][M], total[M];
    for (int j = 0; j < M; ++j) {
      total[j] = _mm256_setzero_ps();
      for (int s = 0; s < kSets; ++s) acc[s][j] = _mm256_setzero_ps();
    }
    const auto sets_sum = [&](int j) {
      return kSets == 2 ? _mm256_add_ps(acc[0][j], acc[kSets - 1][j]) : acc[0][j];
    };
    const int64_t row = o * in;
    for (int64_t k = 0; k < in;) {
      const int64_t block = (row + k) >> shift;
      const int64_t block_end = std::min(in, ((block + 1) << shift) - row);
      const __m256 scale = _mm256_set1_ps(block_scale(scales, block));
      for (; k < block_end; k += 32) {
        __m256 w[4];
        decode32(packed + (row + k) / 2, codes, w);
        if constexpr (!kScaleSums)
          for (int v = 0; v < 4; ++v) w[v] = _mm256_mul_ps(w[v], scale);
        for (int j = 0; j < M; ++j) {
          const float* xj = x + j * in + k;
          for (int v = 0; v < 4; ++v)
            acc[v % kSets][j] =
                _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xj + 8 * v), acc[v % kSets][j]);
        }
      }
      if constexpr (kScaleSums) {
        for (int j = 0; j < M; ++j) {
          total[j] = _mm256_fmadd_ps(sets_sum(j), scale, total[j]);
          for (int s = 0; s < kSets; ++s) acc[s][j] = _mm256_setzero_ps();
        }
      }
    }
    for (int j = 0; j < M; ++j)
      y[j * ldy + o] = horizontal_sum(kScaleSums ? total[j] : sets_sum(j));
  }
}

}  // namespace

void nf4_gemv_avx2(const uint8_t* packed, const BlockScales& scales, int64_t blocksize, int64_t in,
                   const float* x, int64_t m, int64_t row_begin, int64_t row_end, float* y,
                   int64_t ldy) {
  const CodePlanes codes;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  for_each_row_pass(m, [&](auto rows, int64_t i) {
    gemv_rows<decltype(rows)::value>(packed, scales, codes, shift, in, x + i * in, row_begin,
                                     row_end, y + i * ldy, ldy);
  });
}

void order_for_gemv(const float* src, int64_t n, float* dst) {
  for (int64_t g = 0; g < n; g += 8)
    for (int p = 0; p < 4; ++p) {
      dst[g + p] = src[g + 2 * p];
      dst[g + 4 + p] = src[g + 2 * p + 1];
    }
}

}  // namespace lorakit::lora
