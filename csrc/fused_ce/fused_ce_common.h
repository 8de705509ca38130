// The device-independent part of the fused linear cross-entropy ops: argument checks, the chunk
// size, and the chunked pass (GEMMs through ATen: MKL / oneDNN on the CPU, cuBLAS on CUDA) around
// a device's row kernel. Shared by fused_ce_cpu.cpp and fused_ce_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lorakit::fused_ce {

// The row kernel of a device: for logits (rows, vocab) contiguous in hidden's dtype, writes
// logprobs (rows) float32 = log softmax(z)[label] (0 where the label is ignored) and, when
// write_grad, replaces the logits in place by scale * row_scale[i] * d(-logprob_i)/dz (row_scale
// undefined: 1). z is soft-capped first when softcap > 0.
using RowKernel = void (*)(at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& row_scale, double scale, double softcap,
                           bool write_grad, at::Tensor& logprobs);

struct Pass {
  at::Tensor logprobs;     // (T,) float32
  at::Tensor grad_hidden;  // (T, H) hidden's dtype, or (0, H) when not asked for
  at::Tensor grad_weight;  // (V, H) float32, or (0, H) when not asked for
};

// Checks the arguments every op shares (`op` names it in the message).
void check_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                const at::Tensor& labels, int64_t chunk_tokens, double softcap);

// Checks a per-token gradient (T,) float32 on hidden's device.
void check_row_grad(const char* op, const at::Tensor& grad, const at::Tensor& hidden);

// Tokens per chunk: chunk_tokens if positive, else chosen by memory (see the definition).
int64_t chunk_rows(int64_t chunk_tokens, int64_t tokens, int64_t vocab, int64_t hidden,
                   int64_t element_size);

// One pass over the tokens, a chunk at a time: logits = h W^T (one chunk's buffer, reused), the
// row kernel, then grad_hidden[chunk] = g W and grad_weight += g^T h as asked.
Pass chunked_pass(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                  const at::Tensor& row_scale, double scale, double softcap, bool grad_hidden,
                  bool grad_weight, int64_t chunk_tokens, RowKernel kernel);

// The three ops, on a device's row kernel (see csrc/ops.cpp for their contracts).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, bool grad_hidden,
    bool grad_weight, int64_t chunk_tokens, double softcap, RowKernel kernel);
std::tuple<at::Tensor, at::Tensor> logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& labels, bool grad_hidden,
                                            int64_t chunk_tokens, double softcap, RowKernel kernel);
std::tuple<at::Tensor, at::Tensor> logprobs_backward(const at::Tensor& grad,
                                                     const at::Tensor& hidden,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& labels, bool grad_hidden,
                                                     bool grad_weight, int64_t chunk_tokens,
                                                     double softcap, RowKernel kernel);

}  // namespace lorakit::fused_ce
