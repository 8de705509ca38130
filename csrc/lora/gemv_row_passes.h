// How the decode kernels split m input rows into passes over the weight: 8 rows at a time, then
// one pass of 4, 2 and 1 for the rest, each pass a kernel instance for that row count, so every
// group of weights is decoded once per pass and the accumulators stay in registers.
#pragma once

#include <cstdint>
#include <type_traits>

namespace lorakit::lora {

// Calls pass(std::integral_constant<int, M>{}, i) for passes of M rows starting at row i.
template <typename Pass>
void for_each_row_pass(int64_t m, Pass&& pass) {
  int64_t i = 0;
  for (; m - i >= 8; i += 8) pass(std::integral_constant<int, 8>{}, i);
  if (m - i >= 4) pass(std::integral_constant<int, 4>{}, i), i += 4;
  if (m - i >= 2) pass(std::integral_constant<int, 2>{}, i), i += 2;
  if (m - i >= 1) pass(std::integral_constant<int, 1>{}, i);
}

}  // namespace lorakit::lora
