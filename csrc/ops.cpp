// Every lorakit op schema, in one place. Each device file registers its own kernels with
// TORCH_LIBRARY_IMPL(lorakit, CPU|CUDA, m); fake (meta) kernels and autograd live in
// python/lorakit/ops/, the only Python caller of these ops.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_isa.h"

TORCH_LIBRARY(lorakit, m) {
  // ---- NF4 (4-bit NormalFloat), byte-compatible with bitsandbytes ----------------------------
  // packed: uint8[ceil(numel / 2)], element 2i in the high nibble of byte i.
  // absmax: float32[ceil(numel / blocksize)], one scale per block of the flattened input.
  m.def("nf4_quantize(Tensor w, int blocksize=64) -> (Tensor packed, Tensor absmax)");
  // shape is SymInt[] so that torch.compile can trace dynamic shapes through it.
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");

  // ---- blockwise 8-bit (double quantization of NF4 scales; 8-bit optimizer state) -----------
  // code: float32[256], sorted ascending (bitsandbytes' dynamic map, signed or unsigned).
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def(
      "blockwise8_dequantize(Tensor q, Tensor absmax, Tensor code, int blocksize, "
      "ScalarType dtype) -> Tensor");

  // ---- optimizers: in-place AdamW steps (the one family of ops that mutates its inputs) -------
  // Decoupled weight decay, bias correction by `step` (counted from 1), grad multiplied by
  // grad_scale first (max-grad-norm clipping without another pass). param and grad share a
  // dtype (float32, float16 or bfloat16); the state is float32.
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "float grad_scale=1.0) -> ()");
  // 8-bit state: exp_avg / exp_avg_sq are uint8 codes of blocks of 256 (param's shape), each block
  // scaled by a float32 absmax[ceil(numel / 256)]; exp_avg_code is the signed dynamic map,
  // exp_avg_sq_code the unsigned one.
  m.def(
      "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_absmax, Tensor(d!) exp_avg_sq, Tensor(e!) exp_avg_sq_absmax, "
      "Tensor exp_avg_code, Tensor exp_avg_sq_code, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, float grad_scale=1.0) -> ()");

  // ---- LoRA linear: y = x W^T + bias + scale * (x_lora A^T) B^T -----------------------------
  // x: (..., in); weight: (out, in), frozen (never gets a gradient); lora_a: (r, in);
  // lora_b: (out, r); r may be 0 (no adapter). x_lora is the input of the low-rank path after
  // LoRA dropout; None means x itself. xa = x_lora A^T (..., r) is returned for the backward.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, Tensor? x_lora=None) -> (Tensor y, Tensor xa)");
  // grad_xa = scale * grad_y B is d loss / d xa; grad_x holds the low-rank path's share only when
  // x_lora is None, otherwise the caller forms grad_xa A for x_lora (dropout sits between them).
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor xa, float scale, Tensor? x_lora) "
      "-> (Tensor grad_x, Tensor grad_xa, Tensor grad_a, Tensor grad_b)");
  // The same with an NF4 weight (packed as in nf4_dequantize; out = lora_b's rows, in = x's last
  // size), dequantized to x's dtype a tile at a time, never in full. absmax is float32 as in
  // nf4_dequantize or, double-quantized (QLoRA), uint8 codes with nested_absmax (float32, one per
  // 256 codes), nested_code (float32[256]) and nested_offset: the scales of blockwise8_dequantize
  // (blocksize 256) + offset. Passed apart so the decode kernels rebuild each scale as they reach
  // it rather than writing them all out per call.
  m.def(
      "lora_linear_nf4(Tensor x, Tensor packed, Tensor absmax, int blocksize, Tensor? bias, "
      "Tensor lora_a, Tensor lora_b, float scale, Tensor? x_lora=None, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, float nested_offset=0.0) "
      "-> (Tensor y, Tensor xa)");
  m.def(
      "lora_linear_nf4_backward(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, "
      "int blocksize, Tensor lora_a, Tensor lora_b, Tensor xa, float scale, Tensor? x_lora, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, float nested_offset=0.0) "
      "-> (Tensor grad_x, Tensor grad_xa, Tensor grad_a, Tensor grad_b)");

  // ---- merge: fold a LoRA update into the frozen weight -----------------------------------------
  // weight (out, in) += scale * lora_b (out, r) @ lora_a (r, in), summed in float32 and rounded
  // once to the weight's dtype; unmerge passes -scale. In place, unlike the other ops: merging a
  // large weight must not hold a second copy of it.
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale) -> ()");
  // The same for an (out, in) NF4 weight (packed and float32 absmax as in nf4_dequantize): each
  // block is expanded to float32, updated, and quantized again as nf4_quantize quantizes a float32
  // tensor (bitsandbytes' bytes). Returns a fresh packed, absmax; the blocksize is unchanged.
  m.def(
      "nf4_lora_merge(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, Tensor lora_a, "
      "Tensor lora_b, float scale) -> (Tensor packed, Tensor absmax)");

  // ---- fused linear cross-entropy / log-probs: never the whole (tokens, vocab) logits ----------
  // hidden: (T, H); weight: (V, H), the LM head, hidden's dtype (float32, float16 or bfloat16);
  // labels: int64 (T,), in [0, V) or -100 (ignored: no loss, no gradient). z = hidden weight^T,
  // soft-capped to softcap * tanh(z / softcap) when softcap > 0, is formed chunk_tokens rows at a
  // time (0: chosen by memory); each chunk's gradients are formed in the same pass, so backward
  // only scales them. Softmax sums in float32.
  // loss: float32 0-d, sum over non-ignored tokens of -log softmax(z)[label]. grad_hidden (T, H) in
  // hidden's dtype and grad_weight (V, H) float32 are d loss / d hidden and d loss / d weight when
  // asked for, else (0, H).
  m.def(
      "fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, bool grad_hidden, "
      "bool grad_weight, int chunk_tokens=0, float softcap=0.0) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
  // logprobs: float32 (T,), log softmax(z)[label] per token (0 where ignored). grad_hidden: d
  // logprobs[t] / d hidden[t] per row (the gradient for a frozen head: backward scales row t by
  // the incoming grad[t]), or (0, H).
  m.def(
      "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, bool grad_hidden, "
      "int chunk_tokens=0, float softcap=0.0) -> (Tensor logprobs, Tensor grad_hidden)");
  // The backward of sum(grad * logprobs) when the head trains: a second chunked pass (the weight's
  // gradient depends on grad, unknown in the forward). grad: float32 (T,).
  m.def(
      "fused_linear_logprobs_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor labels, "
      "bool grad_hidden, bool grad_weight, int chunk_tokens=0, float softcap=0.0) "
      "-> (Tensor grad_hidden, Tensor grad_weight)");
}

// The pybind11 module only loads the library (running the registrations above) and says what was
// compiled and which CPU kernels run; ops are reached through torch.ops.lorakit, never bound here,
// so they keep going through the dispatcher (autocast, torch.compile, fake tensors). pybind11 is
// torch's own copy, so its internals match torch's.
PYBIND11_MODULE(_C, m) {
  m.doc() = "lorakit native ops (registered under torch.ops.lorakit)";
#ifdef LORAKIT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "cpu_isa", [] { return lorakit::cpu_isa_name(lorakit::cpu_isa()); },
      "The instruction-set level the CPU kernels use (LORAKIT_CPU_ISA or the detected one)");
  m.def(
      "detected_cpu_isa", [] { return lorakit::cpu_isa_name(lorakit::detected_cpu_isa()); },
      "The highest instruction-set level this CPU supports and this build has");
  m.attr("x86_kernels") = lorakit::have_x86_kernels();
  m.attr("avx512_on_simde") = lorakit::avx512_on_simde();
}
