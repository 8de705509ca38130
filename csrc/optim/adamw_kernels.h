// Raw-pointer AdamW kernels for the CPU, compiled once per instruction-set level: baseline x86-64,
// AVX2 + FMA + F16C and AVX-512 (the caller picks with cpu_isa()). Each copy lives in its own
// namespace and this header includes no torch or std template code, so no AVX2 instance of a shared
// inline function can be chosen by the linker for the baseline path.
#pragma once

#include <cstdint>

namespace lorakit::optim {

enum class ParamType { kFloat, kHalf, kBFloat16 };

// Elements per quantization block of the 8-bit state (bitsandbytes' blockwise optimizers use 256).
constexpr int64_t kBlocksize = 256;
// Scale used for an all-zero block; must equal blockwise8::kMinAbsmax (static_assert in
// adamw_tables.cpp), which this header cannot include (it pulls in torch).
constexpr float kMinScale = 1e-38f;

// Scalars of one step, each rounded to float once on the host from the double arithmetic that
// torch.optim.AdamW does in Python, so the per-element math sees the same constants.
struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float one_minus_b1;   // lerp weight of the first moment
  float beta2;          //
  float one_minus_b2;   //
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;            //
  float grad_scale;     // max-grad-norm clipping factor folded into the step (1 for none)
};

// Nearest-code lookup for one sorted 256-entry map without a binary search. The top 16 bits of
// y's float32 bits (sign, exponent and kLutMantissaBits mantissa bits) pick a bucket, by one shift:
// no clamping, no sign handling. Where the map allows it (`exact`), each bucket holds at most one
// midpoint, so the answer in the bucket is `base` up to the midpoint and base + 1 above it. Every y
// in a bucket shares its high 16 bits, so "above the midpoint" is an integer comparison of the low
// 16 bits, sign-adjusted (key_of in the kernels): one table load per value, no float midpoint to
// fetch. Entry = base | threshold << 8, with threshold 0xFFFF (no key exceeds it) where the bucket
// holds no midpoint. NaN has no entry of its own (the kernels test for it). The table spans every
// float (256 KiB), but a step touches only the buckets of its values: for a block scaled into
// [-1, 1], about 2 x 23 exponents x 128 entries.
struct CodeTables {
  static constexpr int kLutMantissaBits = 7;  // buckets narrower than any gap of the dynamic maps
  static constexpr int kBucketShift = 23 - kLutMantissaBits;
  static constexpr int64_t kBuckets = int64_t{1} << (32 - kBucketShift);
  static constexpr uint32_t kNoThreshold = 0xFFFF;

  float code[256];
  float midpoints[255];    // (code[i] + code[i+1]) / 2: the exact rule, used when !exact
  uint32_t lut[kBuckets];  // indexed by y's bits >> kBucketShift
  bool exact;  // every bucket obeys the rule above (true for bitsandbytes' dynamic maps)
};

// Builds the tables from a sorted float32 code (in adamw_tables.cpp, baseline code only).
void build_code_tables(const float* code, CodeTables& tables);
// blockwise8::nearest_code (a binary search) for maps whose tables are not exact. Compiled once,
// in adamw_tables.cpp, so that no AVX2 copy of that shared inline function can reach the
// baseline path.
uint8_t nearest_code_slow(float y, const CodeTables& tables);

#define LORAKIT_OPTIM_DECLARE_KERNELS(ISA)                                                  \
  namespace ISA {                                                                           \
  void adamw_step(ParamType type, void* param, const void* grad, float* exp_avg,            \
                  float* exp_avg_sq, int64_t n, const AdamWScalars& s);                     \
  void adamw8bit_step(ParamType type, void* param, const void* grad, uint8_t* exp_avg,      \
                      float* exp_avg_absmax, uint8_t* exp_avg_sq, float* exp_avg_sq_absmax, \
                      int64_t n, int64_t first_block, int64_t last_block,                   \
                      const CodeTables& m_codes, const CodeTables& v_codes,                 \
                      const AdamWScalars& s);                                               \
  }

LORAKIT_OPTIM_DECLARE_KERNELS(baseline)
LORAKIT_OPTIM_DECLARE_KERNELS(avx2)
LORAKIT_OPTIM_DECLARE_KERNELS(avx512)

}  // namespace lorakit::optim
