// Private: fills a float array with one value in full-width SIMD stores (the compiler's own
// loop for std::fill_n is built for the baseline target, 16 bytes a store). Used to clear
// the aggregator's tile sums, which sit in L2 and are cleared once per tile.
#pragma once

#include <cstddef>

namespace edgefuse::detail {

// p[i] = v for i < n (bit for bit: -0.0f stays -0.0f). p may be unaligned; does not allocate.
void fill_f32(float* p, std::size_t n, float v);

}  // namespace edgefuse::detail
