// Test-only: the library's float element types (f32, BFloat16, Float16) through the
// independent references of reference.h: exact widening by decoding the bits, narrowing with
// round-to-nearest-even computed in double, and the raw bit pattern for bitwise comparisons.
#pragma once

#include <cstdint>

#include "edgefuse/core/dtype.h"
#include "reference.h"

namespace edgefuse_test {

inline float widen(float f) { return f; }
inline float widen(edgefuse::BFloat16 h) { return static_cast<float>(decode_bf16(h.bits)); }
inline float widen(edgefuse::Float16 h) { return static_cast<float>(decode_f16(h.bits)); }

template <typename T>
T narrow(float f);
template <>
inline float narrow<float>(float f) {
  return f;
}
template <>
inline edgefuse::BFloat16 narrow<edgefuse::BFloat16>(float f) {
  return edgefuse::BFloat16{ref_to_bf16(f)};
}
template <>
inline edgefuse::Float16 narrow<edgefuse::Float16>(float f) {
  return edgefuse::Float16{ref_to_f16(f)};
}

inline std::uint32_t raw(float f) { return bits_of(f); }
inline std::uint32_t raw(edgefuse::BFloat16 h) { return h.bits; }
inline std::uint32_t raw(edgefuse::Float16 h) { return h.bits; }

}  // namespace edgefuse_test
