// Every lorakit op schema, in one place. Each device file registers its own kernels with
// TORCH_LIBRARY_IMPL(lorakit, CPU|CUDA, m); fake (meta) kernels and autograd live in
// python/lorakit/ops.py, the only Python caller of these ops.
#include <pybind11/pybind11.h>
#include <torch/library.h>

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
}

// The pybind11 module only loads the library (running the registrations above) and says what was
// compiled; ops are reached through torch.ops.lorakit, never bound here, so they keep going
// through the dispatcher (autocast, torch.compile, fake tensors). pybind11 is torch's own copy,
// so its internals match torch's.
PYBIND11_MODULE(_C, m) {
  m.doc() = "lorakit native ops (registered under torch.ops.lorakit)";
#ifdef LORAKIT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
