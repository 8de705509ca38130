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

// Nearest-code lookup for one sorted 256-entry map without a binary search. |y|'s exponent and
// top kLutMantissaBits mantissa bits pick a bucket (one table half per sign). Where the map allows
// it (`exact`), each bucket holds at most one midpoint, so the answer in the bucket is `base` up to
// the midpoint and base + 1 above it. Every y in a bucket shares its high 16 bits, so "above the
// midpoint" is an integer comparison of the low 16 bits, sign-adjusted (key_of in the kernels):
// one table load per value, no float midpoint to fetch. Entry = base | threshold << 8, with
// threshold 0xFFFF (no key exceeds it) where the bucket holds no midpoint.
struct CodeTables {
  static constexpr int kLutMantissaBits = 7;  // buckets narrower than any gap of the dynamic maps
  static constexpr uint32_t kLowestExponent = 104;  // |y| < 2^-23 shares bucket 0 with 0
  static constexpr int64_t kBuckets = (127 - kLowestExponent) * (1 << kLutMantissaBits) + 1;
  static constexpr uint32_t kNoThreshold = 0xFFFF;

  float code[256];
  float midpoints[255];  // (code[i] + code[i+1]) / 2: the exact rule, used when !exact
  // [0, kBuckets): y >= 0; [kBuckets, 2 kBuckets): y < 0 (sign bit set, -0 included).
  uint32_t lut[2 * kBuckets];
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
