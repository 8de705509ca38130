#pragma once
// Torch-free, so that the device code headers (*.cuh) and the host glue share it.
#include <cstdint>

namespace lorakit {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lorakit
