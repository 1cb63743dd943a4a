// Private: finding the first NaN or Inf in a tensor of any float dtype, on the bit patterns
// (no conversion), for validating client updates and adapter factors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "edgefuse/core/tensor.h"

namespace edgefuse::detail {

inline constexpr std::size_t kNoIndex = static_cast<std::size_t>(-1);

// Index of the first of n bit patterns whose exponent bits (exp_mask) are all set, that is
// the first NaN or Inf, or kNoIndex. SIMD kernels dispatched at run time
// (src/kernels/nonfinite.cc); long arrays are scanned in parallel chunks, and the result is
// the lowest index whatever the thread count.
std::size_t first_nonfinite_bits(const std::uint16_t* p, std::size_t n, std::uint16_t exp_mask);
std::size_t first_nonfinite_bits(const std::uint32_t* p, std::size_t n, std::uint32_t exp_mask);

// Elements [begin, end) of v (begin <= end <= numel): the index, counted from begin, of the
// first NaN or Inf there, or kNoIndex; always kNoIndex for a dtype that is not a float.
inline std::size_t first_nonfinite(const ConstTensorView& v, std::size_t begin, std::size_t end) {
  const std::size_t n = end - begin;
  switch (v.dtype()) {
    case DType::kF32: {
      // safetensors does not align tensors; the kernels load unaligned (LoadU).
      const auto* p = reinterpret_cast<const std::uint32_t*>(v.bytes()) + begin;
      return first_nonfinite_bits(p, n, std::uint32_t{0x7F800000u});
    }
    case DType::kBF16:
      return first_nonfinite_bits(reinterpret_cast<const std::uint16_t*>(v.bytes()) + begin, n,
                                  std::uint16_t{0x7F80u});
    case DType::kF16:
      return first_nonfinite_bits(reinterpret_cast<const std::uint16_t*>(v.bytes()) + begin, n,
                                  std::uint16_t{0x7C00u});
    default:
      return kNoIndex;
  }
}

// The first NaN or Inf of the whole tensor, or kNoIndex.
inline std::size_t first_nonfinite(const ConstTensorView& v) {
  return first_nonfinite(v, 0, static_cast<std::size_t>(v.numel()));
}

}  // namespace edgefuse::detail
