// Input checks shared by every op's glue code. They turn bad input into a Python RuntimeError
// that names the argument, instead of a crash inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/ceil_div.h"

namespace lorakit {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ",
              b.device(), "; move them to the same device");
}

// A NaN or infinite scale would give NaN or garbage, and differently on different kernel paths.
inline void check_finite_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

}  // namespace lorakit
