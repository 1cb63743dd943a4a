// Private: the sums of the Krum statistics pass (src/aggregate/client_statistics.h), in f64.
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefuse::detail {

struct PairSums {
  double squares = 0.0;
  std::uint64_t common = 0;
};

// Over the elements e < n where x[e] and y[e] are both present (not NaN): the sum of
// (x[e] - y[e])^2 in f64, and their count. Element e goes into running sum e % 4; the sums are
// added as (s0 + s1) + (s2 + s3). The order is fixed, so every SIMD target (two f64 lanes at a
// time on each) and the scalar tail give the same bits.
PairSums pair_sums(const float* x, const float* y, std::size_t n);

// The same for one client: the sum of x[e]^2 over its present elements (y absent).
double square_sum(const float* x, std::size_t n);

}  // namespace edgefuse::detail
