// Dispatch over exactly the floating types lorakit kernels support (torch's FLOATING_TYPES
// macros would also instantiate double).
#pragma once

#include <ATen/Dispatch.h>

#define LORAKIT_DISPATCH_FLOAT(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                             \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
