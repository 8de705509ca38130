// The NF4 code table and the nearest-code rule, shared by the CPU and CUDA kernels.
//
// Values: the 16 quantiles of N(0, 1) normalised to [-1, 1] from the QLoRA paper (Dettmers et
// al. 2023, appendix E), as float32, exactly as bitsandbytes stores them.
// Rounding: bitsandbytes 0.50 quantizes by bucketing the scaled value against the float32
// midpoints of neighbouring codes (torch.bucketize, right=False): a value equal to a midpoint goes
// to the lower code, NaN goes to the last code (15). nf4_index reproduces that bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORAKIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORAKIT_HOST_DEVICE inline
#endif

namespace lorakit::nf4 {

constexpr int kSupportedBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};

// Smallest absmax that bitsandbytes divides by in a last, partial block (it clamps to 1e-38).
constexpr float kMinPartialAbsmax = 1e-38f;

constexpr float kCode[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Float32 midpoints (code[i] + code[i+1]) / 2, the bucket boundaries.
constexpr float midpoint(int i) { return (kCode[i] + kCode[i + 1]) / 2.0f; }

// Index of the bucket holding x: the number of midpoints strictly below x. Written as
// 15 - #(x <= midpoint) so that NaN (every comparison false) lands in bucket 15, as in torch.
LORAKIT_HOST_DEVICE uint8_t nf4_index(float x) {
  // A local constexpr copy, so device code sees compile-time constants rather than a host array.
  constexpr float kMid[15] = {midpoint(0),  midpoint(1),  midpoint(2),  midpoint(3),  midpoint(4),
                              midpoint(5),  midpoint(6),  midpoint(7),  midpoint(8),  midpoint(9),
                              midpoint(10), midpoint(11), midpoint(12), midpoint(13), midpoint(14)};
  int below_or_equal = 0;
  for (int i = 0; i < 15; ++i) below_or_equal += (x <= kMid[i]) ? 1 : 0;
  return static_cast<uint8_t>(15 - below_or_equal);
}

// Max that propagates NaN, as torch.max does (fmaxf would drop it).
LORAKIT_HOST_DEVICE float nan_max(float a, float b) {
  if (a != a) return a;
  return (b != b || b > a) ? b : a;
}

// The 16 dequantized values of one block, each rounded once from float32 to the output type, as
// bitsandbytes does (code * absmax in float32, then one conversion).
template <typename scalar_t>
inline void block_table(float absmax, scalar_t* table) {
  for (int j = 0; j < 16; ++j) table[j] = static_cast<scalar_t>(kCode[j] * absmax);
}

}  // namespace lorakit::nf4
