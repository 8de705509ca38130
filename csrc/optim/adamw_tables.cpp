// Bucket tables for the CPU 8-bit step and the runtime CPU check that picks a kernel copy.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "blockwise8/blockwise8_checks.h"
#include "blockwise8/blockwise8_code.h"
#include "optim/adamw_kernels.h"

namespace lorakit::optim {

static_assert(kMinScale == blockwise8::kMinAbsmax, "8-bit state must scale zero blocks alike");

namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

void build_code_tables(const float* code, CodeTables& t) {
  std::memcpy(t.code, code, sizeof t.code);
  std::memset(t.lut, 0, sizeof t.lut);
  for (int i = 0; i + 1 < 256; ++i) t.midpoints[i] = (code[i] + code[i + 1]) / 2.0f;
  t.midpoints[255] = std::numeric_limits<float>::infinity();
  constexpr int shift = 23 - CodeTables::kLutMantissaBits;
  constexpr uint32_t first = CodeTables::kLowestExponent << CodeTables::kLutMantissaBits;
  int fixups = 0;
  for (int64_t b = 0; b < CodeTables::kBuckets; ++b) {
    // The magnitudes that land in bucket b: [lo, hi]; bucket 0 also takes everything smaller,
    // the last bucket everything larger.
    const float lo = b == 0 ? 0.0f : from_bits(static_cast<uint32_t>(first + b) << shift);
    const float hi = b + 1 == CodeTables::kBuckets
                         ? std::numeric_limits<float>::infinity()
                         : from_bits((static_cast<uint32_t>(first + b + 1) << shift) - 1);
    // nearest_code is monotone in y, so the lowest value of a bucket gives its smallest answer
    // and the highest its largest; their difference bounds the fix-up steps.
    const uint8_t pos_lo = blockwise8::nearest_code(lo, t.midpoints);
    const uint8_t pos_hi = blockwise8::nearest_code(hi, t.midpoints);
    const uint8_t neg_lo = blockwise8::nearest_code(-hi, t.midpoints);
    const uint8_t neg_hi = blockwise8::nearest_code(-lo, t.midpoints);
    t.lut[b] = pos_lo;
    t.lut[CodeTables::kBuckets + b] = neg_lo;
    fixups = std::max({fixups, pos_hi - pos_lo, neg_hi - neg_lo});
  }
  t.fixups = fixups;
}

bool cpu_has_avx2_fma_f16c() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace lorakit::optim
