// Private: DP-FedAvg's noise added to a tile's sums (aggregate/clipping.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/aggregate/clipping.h"

namespace edgefuse::detail {

// For each i < n with count[i] > 0: acc[i] += wsum[i] · (z·C / count[i]) · ξ (in f64, rounded
// once), ξ = dp_standard_normal(seed, round, tensor, first_element + i); so acc / wsum, the
// element's fused mean, moves by N(0, (z·C/m)²) with m = count[i] covering clients.
void add_dp_noise(float* acc, const float* wsum, const std::uint32_t* count, std::size_t n,
                  std::uint64_t first_element, std::uint32_t tensor, const ClipOptions& clip);

}  // namespace edgefuse::detail
