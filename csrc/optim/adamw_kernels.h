// Raw-pointer AdamW kernels for the CPU, compiled twice: once for baseline x86-64 and once with
// AVX2 + FMA + F16C (the caller picks by a runtime CPU check). Each copy lives in its own namespace
// and this header includes no torch or std template code, so no AVX2 instance of a shared inline
// function can be chosen by the linker for the baseline path.
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

// Nearest-code lookup for one sorted 256-entry map, exact and without a binary search: the top
// kLutMantissaBits mantissa bits and the exponent of |y| pick a bucket whose entry is the answer
// for the bucket's lowest value; at most `fixups` steps of "y > midpoint -> next code" finish it
// (1 for bitsandbytes' dynamic maps, whose codes are further apart than a bucket is wide).
struct CodeTables {
  static constexpr int kLutMantissaBits = 7;
  static constexpr uint32_t kLowestExponent = 104;  // |y| < 2^-23 shares bucket 0 with 0
  static constexpr int64_t kBuckets = (127 - kLowestExponent) * (1 << kLutMantissaBits) + 1;

  float code[256];
  float midpoints[256];  // (code[i] + code[i+1]) / 2; midpoints[255] = +inf ends a walk
  // [0, kBuckets): y >= 0; [kBuckets, 2 kBuckets): y < 0; 3 padding bytes for 4-byte gathers.
  uint8_t lut[2 * kBuckets + 3];
  int fixups;
};

// Builds the tables from a sorted float32 code (in adamw_tables.cpp, baseline code only).
void build_code_tables(const float* code, CodeTables& tables);

bool cpu_has_avx2_fma_f16c();

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

}  // namespace lorakit::optim
