// Bucket tables for the CPU 8-bit step and the runtime CPU check that picks a kernel copy.
#include <cmath>
#include <cstring>

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

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The entry of the bucket `bucket`, whose values y run from `first` to `last` (first < last, same
// sign): nearest_code is monotone in y, so its answers there are the ones at the two ends and
// every integer between. One step (or none) fits the entry format; the step lies at
// midpoints[base] (the last y answered `base`). Returns false if there are more steps than one,
// or if the midpoint's bits are not the bucket's (a midpoint of -0.0 steps between +0.0 and the
// positive subnormals, but its key would be compared within the negative bucket).
bool bucket_entry(const float* midpoints, int64_t bucket, float first, float last,
                  uint32_t& entry) {
  const uint8_t base = blockwise8::nearest_code(first, midpoints);
  const uint8_t top = blockwise8::nearest_code(last, midpoints);
  entry = base | CodeTables::kNoThreshold << 8;
  if (top == base) return true;
  const uint32_t mid = bits_of(midpoints[base]);
  if (top != base + 1 || mid >> CodeTables::kBucketShift != bucket) return false;
  const uint32_t low = mid & 0xFFFFu;
  // key_of in the kernels: y > mid <=> key(y) > key(mid), within one bucket.
  entry = base | (mid >> 31 ? low ^ 0xFFFFu : low) << 8;
  return true;
}

}  // namespace

void build_code_tables(const float* code, CodeTables& t) {
  std::memcpy(t.code, code, sizeof t.code);
  for (int i = 0; i + 1 < 256; ++i) t.midpoints[i] = (code[i] + code[i + 1]) / 2.0f;
  constexpr int shift = CodeTables::kBucketShift;
  constexpr uint32_t low_bits = (1u << shift) - 1;
  constexpr uint32_t sign = 0x80000000u;
  constexpr uint32_t infinity = 0x7F800000u;
  t.exact = true;
  for (int64_t b = 0; b < CodeTables::kBuckets; ++b) {
    const uint32_t first = static_cast<uint32_t>(b) << shift;  // the bucket's bits: first..last
    const uint32_t last = first | low_bits;
    if ((first & ~sign) >= infinity) {
      // Infinity and NaNs: the answer of the infinity; the kernels send NaN to 255 themselves.
      t.lut[b] = blockwise8::nearest_code(from_bits(first & (sign | infinity)), t.midpoints) |
                 CodeTables::kNoThreshold << 8;
      continue;
    }
    // Bits order like magnitudes, so a negative bucket runs from its last bits' value upwards.
    t.exact &= first & sign
                   ? bucket_entry(t.midpoints, b, from_bits(last), from_bits(first), t.lut[b])
                   : bucket_entry(t.midpoints, b, from_bits(first), from_bits(last), t.lut[b]);
  }
}

uint8_t nearest_code_slow(float y, const CodeTables& t) {
  return blockwise8::nearest_code(y, t.midpoints);
}

}  // namespace lorakit::optim
