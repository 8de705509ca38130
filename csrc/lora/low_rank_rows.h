// The low-rank term of a LoRA layer for a few input rows (decode), on raw pointers, in float32:
//   xa[t][j] = sum_k x[t][k] a[j][k]                                   (the rank-r input)
//   y[t][o]  = round(base[t][o] + bias[o] + scale * sum_j xa[t][j] b[o][j])
// As tensor ops (dtype conversions, two skinny products, the bias add, the final rounding) these
// cost far more in dispatch than in their r * (in + out) multiply-adds per row: for one row of a
// 2048 x 2048 bfloat16 QLoRA layer, about a quarter of the call.
// Templates over the element types, which need only a conversion to float.
#pragma once

#include <cstdint>

namespace lorakit::lora {

// sum_k p[k] q[k] in float32, in eight interleaved partial sums: the compiler keeps them in one
// vector register, where a single running sum would be a chain of dependent adds.
template <typename P, typename Q>
float dot(const P* p, const Q* q, int64_t n) {
  constexpr int kParts = 8;
  float part[kParts] = {};
  int64_t k = 0;
  for (; k + kParts <= n; k += kParts)
    for (int i = 0; i < kParts; ++i)
      part[i] += static_cast<float>(p[k + i]) * static_cast<float>(q[k + i]);
  float sum = 0.0f;
  for (int i = 0; i < kParts; ++i) sum += part[i];
  for (; k < n; ++k) sum += static_cast<float>(p[k]) * static_cast<float>(q[k]);
  return sum;
}

// xa (tokens, rank) = x (tokens, in) a^T, a being (rank, in).
template <typename T>
void compute_xa(const T* x, const T* a, int64_t tokens, int64_t in, int64_t rank, float* xa) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < rank; ++j) xa[t * rank + j] = dot(x + t * in, a + j * in, in);
}

// Output rows [begin, end) of y (tokens, out) from the float32 base product (tokens, out), the
// bias (out, or null), xa (tokens, rank) and b (out, rank).
template <typename T>
void finish_rows(const float* base, const T* bias, const float* xa, const T* b, float scale,
                 int64_t tokens, int64_t out, int64_t rank, int64_t begin, int64_t end, T* y) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = begin; o < end; ++o) {
      float v = base[t * out + o];
      if (bias != nullptr) v += static_cast<float>(bias[o]);
      y[t * out + o] = static_cast<T>(v + scale * dot(xa + t * rank, b + o * rank, rank));
    }
}

}  // namespace lorakit::lora
