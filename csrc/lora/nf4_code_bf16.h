// The NF4 code values rounded to bfloat16, for the decode kernels that meet bfloat16 activations
// with codes of that precision: AVX-512 BF16's dot products, and the AVX2 kernel's bfloat16 path,
// which widens such codes to float32 with integer shifts instead of byte shuffles.
#pragma once

#include <array>
#include <bit>
#include <cstdint>

#include "nf4/nf4_code.h"

namespace lorakit::lora {

// Bits of each code in bfloat16, rounded to nearest, ties to even (the codes are finite). Computed
// at compile time, so no function of this header is shared by the per-level kernel files.
inline constexpr std::array<uint16_t, 16> kCodeBf16Bits = [] {
  std::array<uint16_t, 16> bits{};
  for (int i = 0; i < 16; ++i) {
    const auto u = std::bit_cast<uint32_t>(nf4::kCode[i]);
    bits[i] = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  return bits;
}();

}  // namespace lorakit::lora
