// Private: the sort order of the robust aggregates (kernels/robust_reduce.h) and their scalar
// path: floats as signed integer keys in the total order of their bit patterns, an absent
// client (NaN) as the largest key, and one element reduced the way the SIMD network does it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "edgefuse/kernels/robust_reduce.h"

namespace edgefuse::detail {

inline constexpr std::size_t kMaxNetworkClients = 64;
inline constexpr std::int32_t kAbsentKey = std::numeric_limits<std::int32_t>::max();

inline std::int32_t float_key(float x) {
  std::int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}
inline float key_float(std::int32_t key) {
  const std::int32_t bits = key ^ ((key >> 31) & 0x7FFFFFFF);
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// trim[c] = floor(beta * c) in double, for c <= k (scipy's int(proportiontocut * nobs)).
inline std::vector<std::int32_t> trim_table(double beta, std::size_t k) {
  std::vector<std::int32_t> t(k + 1);
  for (std::size_t c = 0; c <= k; ++c)
    t[c] = static_cast<std::int32_t>(beta * static_cast<double>(c));
  return t;
}

// Element i in scalar code, with the same keys, ranks and additions as the network: the
// trimmed sum starts at +0 and adds +0 for every rank outside [t, c - t).
inline void RobustScalar(const float* values, std::size_t k, std::size_t stride, std::size_t i,
                         RobustRule rule, const std::int32_t* trim, float* out,
                         std::uint32_t* count, std::int32_t* keys) {
  std::int32_t c = 0;
  for (std::size_t j = 0; j < k; ++j) {
    const float x = values[j * stride + i];
    const bool absent = x != x;
    keys[j] = absent ? kAbsentKey : float_key(x);
    c += absent ? 0 : 1;
  }
  std::sort(keys, keys + k);
  count[i] = static_cast<std::uint32_t>(c);
  if (c == 0) {
    out[i] = 0.0f;
    return;
  }
  if (rule == RobustRule::kMedian) {
    const float lo = key_float(keys[(c - 1) / 2]), hi = key_float(keys[c / 2]);
    out[i] = (c & 1) ? lo : 0.5f * lo + 0.5f * hi;
    return;
  }
  const std::int32_t t = trim[c], end = c - t;
  float sum = 0.0f;
  for (std::size_t j = 0; j < k; ++j) {
    const auto r = static_cast<std::int32_t>(j);
    sum = sum + (r >= t && r < end ? key_float(keys[j]) : 0.0f);
  }
  out[i] = sum / static_cast<float>(end - t);
}

}  // namespace edgefuse::detail
