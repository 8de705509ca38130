#pragma once
// Vector loads and stores shared by the CUDA kernels: one 16-byte access moves a whole Vec, and
// the unsigned word of the matching width holds the packed codes behind it.

#include <cstdint>

namespace lorakit {

template <typename T, int N>
struct alignas(16) Vec {
  T v[N];
};

// Values of scalar_t per 16-byte store: 8 for 16-bit types, 4 for float.
template <typename scalar_t>
constexpr int values_per_16_bytes() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// The unsigned integer of kBytes bytes, loaded in one instruction.
template <int kBytes>
struct UnsignedWord;
template <>
struct UnsignedWord<2> {
  using type = uint16_t;
};
template <>
struct UnsignedWord<4> {
  using type = uint32_t;
};
template <>
struct UnsignedWord<8> {
  using type = uint2;
};

}  // namespace lorakit
