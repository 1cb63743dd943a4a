// Private: finding the first NaN or Inf in a tensor of any float dtype, on the bit patterns
// (no conversion), for validating client updates and adapter factors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "edgefuse/core/tensor.h"

namespace edgefuse::detail {

inline constexpr std::size_t kNoIndex = static_cast<std::size_t>(-1);

// Index of the first NaN or Inf among n bit patterns, or kNoIndex. Blocks are OR-reduced without branches so the
// scan vectorises; only a block with a hit is searched element by element.
template <typename Bits>
inline std::size_t first_nonfinite_bits(const Bits* p, std::size_t n, Bits exp_mask) {
  constexpr std::size_t kBlock = 1024;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t e = std::min(n, b + kBlock);
    Bits hit = 0;
    for (std::size_t i = b; i < e; ++i) hit |= static_cast<Bits>((p[i] & exp_mask) == exp_mask);
    if (hit) {
      for (std::size_t i = b; i < e; ++i) {
        if ((p[i] & exp_mask) == exp_mask) return i;
      }
    }
  }
  return kNoIndex;
}

inline std::size_t first_nonfinite(const ConstTensorView& v) {
  const auto n = static_cast<std::size_t>(v.numel());
  switch (v.dtype()) {
    case DType::kF32: {
      // safetensors does not align tensors; the x86-64 and AArch64 targets we build for
      // allow unaligned u32 loads (the kernels use LoadU for the same reason).
      const auto* p = reinterpret_cast<const std::uint32_t*>(v.bytes());
      return first_nonfinite_bits<std::uint32_t>(p, n, 0x7F800000u);
    }
    case DType::kBF16:
      return first_nonfinite_bits<std::uint16_t>(reinterpret_cast<const std::uint16_t*>(v.bytes()),
                                                 n, 0x7F80u);
    case DType::kF16:
      return first_nonfinite_bits<std::uint16_t>(reinterpret_cast<const std::uint16_t*>(v.bytes()),
                                                 n, 0x7C00u);
    default:
      return kNoIndex;
  }
}

}  // namespace edgefuse::detail
