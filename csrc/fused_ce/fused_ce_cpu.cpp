// Fused linear cross-entropy on the CPU: the row kernel of fused_ce_rows_impl.h (one copy per
// instruction-set level, picked with cpu_isa()) over the rows of a chunk in parallel, inside the
// shared chunked pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_isa.h"
#include "fused_ce/fused_ce_common.h"
#include "fused_ce/fused_ce_rows.h"

namespace lorakit::fused_ce {
namespace {

using Rows = decltype(&baseline::logprob_rows);

LogitType logit_type(at::ScalarType t) {
  if (t == at::kHalf) return LogitType::kHalf;
  if (t == at::kBFloat16) return LogitType::kBFloat16;
  return LogitType::kFloat;
}

void rows_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_scale,
              double scale, double softcap, bool write_grad, at::Tensor& logprobs) {
  const int64_t vocab = logits.size(1);
  const RowArgs args{vocab,
                     labels.const_data_ptr<int64_t>(),
                     row_scale.defined() ? row_scale.const_data_ptr<float>() : nullptr,
                     static_cast<float>(scale),
                     static_cast<float>(softcap),
                     write_grad,
                     logprobs.mutable_data_ptr<float>()};
  const Rows rows =
      kernel_for_cpu_isa(&baseline::logprob_rows, LORAKIT_X86_KERNEL(avx2::logprob_rows),
                         LORAKIT_X86_KERNEL(avx512::logprob_rows));
  const LogitType type = logit_type(logits.scalar_type());
  void* data = logits.data_ptr();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / vocab);  // ~64K logits a task
  at::parallel_for(0, logits.size(0), grain,
                   [&](int64_t first, int64_t last) { rows(type, data, first, last, args); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, bool grad_hidden,
    bool grad_weight, int64_t chunk_tokens, double softcap) {
  return cross_entropy(hidden, weight, labels, grad_hidden, grad_weight, chunk_tokens, softcap,
                       &rows_cpu);
}

std::tuple<at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& labels, bool grad_hidden,
                                                int64_t chunk_tokens, double softcap) {
  return logprobs(hidden, weight, labels, grad_hidden, chunk_tokens, softcap, &rows_cpu);
}

std::tuple<at::Tensor, at::Tensor> logprobs_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& hidden,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& labels, bool grad_hidden,
                                                         bool grad_weight, int64_t chunk_tokens,
                                                         double softcap) {
  return logprobs_backward(grad, hidden, weight, labels, grad_hidden, grad_weight, chunk_tokens,
                           softcap, &rows_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("fused_linear_cross_entropy", &cross_entropy_cpu);
  m.impl("fused_linear_logprobs", &logprobs_cpu);
  m.impl("fused_linear_logprobs_backward", &logprobs_backward_cpu);
}

}  // namespace lorakit::fused_ce
