// Private: a tensor as rows, the unit of the aggregator's tiles: dim 0 for rank >= 2, else one
// row.
#pragma once

#include <cstdint>

#include "edgefuse/core/tensor.h"

namespace edgefuse::detail {

struct RowShape {
  std::uint64_t rows, row_len;
};

inline RowShape row_shape(const Shape& s) {
  if (s.rank() >= 2) return {s[0], s[0] ? s.numel() / s[0] : 0};
  return {1, s.numel()};
}

}  // namespace edgefuse::detail
