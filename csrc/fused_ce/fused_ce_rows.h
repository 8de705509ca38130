// The row-wise part of fused linear cross-entropy on the CPU, on raw pointers: per row of logits,
// the log-probability of its label and, in place, the gradient of the negative log-probability.
// Compiled once per instruction-set level (fused_ce_rows_{baseline,avx2,avx512}.cpp; the caller
// picks with cpu_isa()); this header and the kernels include no torch headers, so no vectorised
// copy of a shared inline function can be picked by the linker for the baseline path.
#pragma once

#include <cstdint>

namespace lorakit::fused_ce {

// The label of a token that is not trained on (PyTorch's cross_entropy ignore_index default).
constexpr int64_t kIgnoreIndex = -100;

enum class LogitType { kFloat, kHalf, kBFloat16 };

// One chunk of rows [first, last) of `logits` (rows x vocab, row-major, of `type`).
struct RowArgs {
  int64_t vocab;
  const int64_t* labels;   // per row, in [0, vocab) or kIgnoreIndex
  const float* row_scale;  // per row, or null for 1
  float scale;             // multiplies every row's gradient
  float softcap;           // z -> softcap * tanh(z / softcap) first; 0: none
  bool write_grad;         // replace the logits by the gradient
  float* logprobs;         // out, per row: log softmax(z)[label], 0 for an ignored row
};

#define LORAKIT_FUSED_CE_DECLARE_ROWS(ISA)                                     \
  namespace ISA {                                                              \
  void logprob_rows(LogitType type, void* logits, int64_t first, int64_t last, \
                    const RowArgs& args);                                      \
  }

LORAKIT_FUSED_CE_DECLARE_ROWS(baseline)
LORAKIT_FUSED_CE_DECLARE_ROWS(avx2)
LORAKIT_FUSED_CE_DECLARE_ROWS(avx512)

}  // namespace lorakit::fused_ce
