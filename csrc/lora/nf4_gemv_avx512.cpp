#include "lora/nf4_gemv.h"
#include "lora/nf4_gemv_rows.h"
#include "nf4/nf4_avx512.h"
#include "nf4/nf4_code.h"

namespace lorakit::lora {
namespace {

// The unscaled codes of the 32 weights in 16 packed bytes, in order: one permute per 16 looks
// them up in the 16-entry table held in one register.
inline void decode32(const uint8_t* bytes, __m512 codes, __m512 w[2]) {
  __m128i first, second;
  nf4::nibbles32(bytes, first, second);
  w[0] = _mm512_permutexvar_ps(nf4::widen32(first), codes);
  w[1] = _mm512_permutexvar_ps(nf4::widen32(second), codes);
}

// The vector type of nf4_gemv_rows.h.
struct Avx512 {
  using Reg = __m512;
  using Codes = __m512;  // the 16 codes, one per lane
  static constexpr int kVectors = 2;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float f) { return _mm512_set1_ps(f); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void decode32(const uint8_t* bytes, const Codes& codes, Reg w[2]) {
    lora::decode32(bytes, codes, w);
  }
  static float sum(Reg v) { return nf4::horizontal_sum(v); }
};

}  // namespace

void nf4_gemv_avx512(const uint8_t* packed, const BlockScales& scales, int64_t blocksize,
                     int64_t in, const float* x, int64_t m, int64_t row_begin, int64_t row_end,
                     float* y, int64_t ldy) {
  gemv<Avx512>(packed, scales, _mm512_loadu_ps(nf4::kCode), blocksize, in, x, m, row_begin, row_end,
               y, ldy);
}

}  // namespace lorakit::lora
