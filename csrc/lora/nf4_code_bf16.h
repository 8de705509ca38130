// The NF4 code values rounded to bfloat16, for the decode kernels that meet bfloat16 activations
// with codes of that precision: AVX-512 BF16's dot products, and the AVX2 kernel's bfloat16 path,
// which widens such codes to float32 with integer shifts instead of byte shuffles.
#pragma once

#include <cstdint>
#include <cstring>

#include "nf4/nf4_code.h"

namespace lorakit::lora {

// The bits of code i in bfloat16, rounded to nearest, ties to even (the codes are finite).
inline uint16_t nf4_code_bf16_bits(int i) {
  uint32_t bits;
  std::memcpy(&bits, &nf4::kCode[i], sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

}  // namespace lorakit::lora
