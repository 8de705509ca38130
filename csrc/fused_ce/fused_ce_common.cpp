#include "fused_ce/fused_ce_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

#include "common/ceil_div.h"
#include "common/checks.h"
#include "fused_ce/fused_ce_rows.h"

namespace lorakit::fused_ce {

namespace {

// Below this many rows per chunk the GEMMs lose speed (the head's weight is streamed once per
// chunk); 32 rows of a 128K vocabulary are 16 MiB of float32 logits.
constexpr int64_t kMinChunk = 32;
// A chunk's logits never take more than this (2048 tokens of a 128K vocabulary in bfloat16).
constexpr int64_t kMaxChunkBytes = int64_t{512} << 20;

void check_labels(const char* op, const at::Tensor& labels, int64_t vocab) {
  // One reduction (and, on CUDA, one synchronisation) per call: a label out of range would
  // otherwise read outside a row of logits.
  const at::Tensor bad =
      labels.ne(kIgnoreIndex).logical_and_(labels.lt(0).logical_or_(labels.ge(vocab)));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(false, op, ": labels[", i, "] = ", labels[i].item<int64_t>(),
              " is outside the vocabulary [0, ", vocab, ") and is not the ignore index ",
              kIgnoreIndex);
}

}  // namespace

void check_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                const at::Tensor& labels, int64_t chunk_tokens, double softcap) {
  TORCH_CHECK(is_supported_float(hidden.scalar_type()), op,
              ": hidden must be float32, float16 or bfloat16, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight is ",
              weight.scalar_type(), " but hidden is ", hidden.scalar_type(),
              "; pass both in one dtype");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op,
              ": hidden must be (tokens, hidden) and weight (vocab, hidden), got ", hidden.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": hidden ", hidden.sizes(), " and weight ",
              weight.sizes(), " differ in the hidden size");
  TORCH_CHECK(weight.size(0) > 0, op, ": weight has no rows (an empty vocabulary)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
              ": labels must be (tokens,) = (", hidden.size(0), ",), got ", labels.sizes());
  check_same_device(hidden, "hidden", weight, "weight");
  check_same_device(hidden, "hidden", labels, "labels");
  TORCH_CHECK(chunk_tokens >= 0, op, ": chunk_tokens must be >= 0 (0: chosen by memory), got ",
              chunk_tokens);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap must be finite and >= 0 (0: none), got ", softcap);
  check_labels(op, labels, weight.size(0));
}

void check_row_grad(const char* op, const at::Tensor& grad, const at::Tensor& hidden) {
  check_dtype(grad, at::kFloat, "grad");
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == hidden.size(0), op, ": grad must be (tokens,) = (",
              hidden.size(0), ",), got ", grad.sizes());
  check_same_device(grad, "grad", hidden, "hidden");
}

int64_t chunk_rows(int64_t chunk_tokens, int64_t tokens, int64_t vocab, int64_t hidden,
                   int64_t element_size) {
  if (chunk_tokens > 0) return chunk_tokens;
  // At least a quarter of the tokens: on the CPU, GEMMs of fewer rows ran measurably slower per
  // token (the weight is re-read per chunk), and a quarter of the logits is still well under the
  // unfused path's peak (logits, their log-softmax and their gradient); at least the hidden
  // states' size in logits (Liger-Kernel's rule); at most kMaxChunkBytes.
  const int64_t wanted = std::max(ceil_div(tokens * hidden, vocab), ceil_div(tokens, 4));
  const int64_t most = std::max(kMinChunk, kMaxChunkBytes / (vocab * element_size));
  return std::clamp(wanted, kMinChunk, most);
}

Pass chunked_pass(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                  const at::Tensor& labels_in, const at::Tensor& row_scale_in, double scale,
                  double softcap, bool grad_hidden, bool grad_weight, int64_t chunk_tokens,
                  RowKernel kernel) {
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor row_scale = row_scale_in.defined() ? row_scale_in.contiguous() : row_scale_in;
  const int64_t tokens = hidden.size(0), size = hidden.size(1), vocab = weight.size(0);
  const auto floats = hidden.options().dtype(at::kFloat);
  Pass out{at::empty({tokens}, floats),
           at::empty({grad_hidden ? tokens : 0, size}, hidden.options()),
           grad_weight ? at::zeros({vocab, size}, floats) : at::empty({0, size}, floats)};
  if (tokens == 0) return out;
  const bool write_grad = grad_hidden || grad_weight;
  const int64_t rows =
      std::min(tokens, chunk_rows(chunk_tokens, tokens, vocab, size, hidden.element_size()));
  at::Tensor buffer = at::empty({rows, vocab}, hidden.options());  // the one chunk of logits
  const at::Tensor weight_t = weight.t();
  for (int64_t start = 0; start < tokens; start += rows) {
    const int64_t n = std::min(rows, tokens - start);
    const at::Tensor h = hidden.narrow(0, start, n);
    at::Tensor logits = buffer.narrow(0, 0, n);
    at::mm_out(logits, h, weight_t);
    at::Tensor logprobs = out.logprobs.narrow(0, start, n);
    kernel(logits, labels.narrow(0, start, n),
           row_scale.defined() ? row_scale.narrow(0, start, n) : row_scale, scale, softcap,
           write_grad, logprobs);
    if (grad_hidden) {
      at::Tensor gh = out.grad_hidden.narrow(0, start, n);
      at::mm_out(gh, logits, weight);
    }
    if (grad_weight) {
      // Summed over chunks in float32: a half-precision sum would round once per chunk.
      if (hidden.scalar_type() == at::kFloat)
        out.grad_weight.addmm_(logits.t(), h);
      else
        out.grad_weight.add_(at::mm(logits.t(), h));
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, bool grad_hidden,
    bool grad_weight, int64_t chunk_tokens, double softcap, RowKernel kernel) {
  check_args("fused_linear_cross_entropy", hidden, weight, labels, chunk_tokens, softcap);
  Pass p = chunked_pass(hidden, weight, labels, at::Tensor(), 1.0, softcap, grad_hidden,
                        grad_weight, chunk_tokens, kernel);
  return {p.logprobs.sum().neg_(), p.grad_hidden, p.grad_weight};
}

std::tuple<at::Tensor, at::Tensor> logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& labels, bool grad_hidden,
                                            int64_t chunk_tokens, double softcap,
                                            RowKernel kernel) {
  check_args("fused_linear_logprobs", hidden, weight, labels, chunk_tokens, softcap);
  // scale -1: the kernel's gradient is that of -logprob.
  Pass p = chunked_pass(hidden, weight, labels, at::Tensor(), -1.0, softcap, grad_hidden, false,
                        chunk_tokens, kernel);
  return {p.logprobs, p.grad_hidden};
}

std::tuple<at::Tensor, at::Tensor> logprobs_backward(const at::Tensor& grad,
                                                     const at::Tensor& hidden,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& labels, bool grad_hidden,
                                                     bool grad_weight, int64_t chunk_tokens,
                                                     double softcap, RowKernel kernel) {
  const char* op = "fused_linear_logprobs_backward";
  check_args(op, hidden, weight, labels, chunk_tokens, softcap);
  check_row_grad(op, grad, hidden);
  Pass p = chunked_pass(hidden, weight, labels, grad, -1.0, softcap, grad_hidden, grad_weight,
                        chunk_tokens, kernel);
  return {p.grad_hidden, p.grad_weight};
}

}  // namespace lorakit::fused_ce
