// Dispatch unit and argument checks for kernels/robust_reduce.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/robust_reduce.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/robust_reduce-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

void RobustReduceF32(const float* values, std::size_t k, std::size_t stride, std::size_t b,
                     std::size_t e, RobustRule rule, const std::int32_t* trim, float* out,
                     std::uint32_t* count) {
  RobustRange(values, k, stride, b, e, rule, trim, out, count);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(RobustReduceF32);

namespace {

// The arguments both reductions share: k clients' columns of n values `stride` apart, and the
// n outputs and counts, none overlapping another. Throws Error naming `fn`.
void check_columns(const char* fn, const float* values, std::size_t k, std::size_t stride,
                   std::size_t n, const float* out, const std::uint32_t* count) {
  if (k == 0) detail::fail(fn, ": k = 0 clients");
  if (stride < n) detail::fail(fn, ": stride ", stride, " is below n = ", n);
  if (k > 1 && stride > (SIZE_MAX - n) / (k - 1)) detail::fail(fn, ": k x stride overflows");
  const std::size_t span = (k - 1) * stride + n;
  detail::check_pointer(fn, "values", values, n == 0 ? 0 : span);
  detail::check_pointer(fn, "out", out, n);
  detail::check_pointer(fn, "count", count, n);
  detail::check_disjoint(fn, "out", out, n * 4, "values", values, n == 0 ? 0 : span * 4);
  detail::check_disjoint(fn, "count", count, n * 4, "values", values, n == 0 ? 0 : span * 4);
  detail::check_disjoint(fn, "out", out, n * 4, "count", count, n * 4);
}

}  // namespace

void robust_reduce(const float* values, std::size_t k, std::size_t stride, std::size_t n,
                   RobustRule rule, double beta, float* out, std::uint32_t* count) {
  constexpr const char* kFn = "robust_reduce";
  if (rule != RobustRule::kMedian && rule != RobustRule::kTrimmedMean) {
    detail::fail(kFn, ": unknown rule ", static_cast<int>(rule));
  }
  if (rule == RobustRule::kTrimmedMean && !(beta >= 0.0 && beta < 0.5)) {
    detail::fail(kFn, ": beta = ", beta, " must be in [0, 0.5)");
  }
  check_columns(kFn, values, k, stride, n, out, count);
  if (n == 0) return;
  const std::vector<std::int32_t> trim = detail::trim_table(beta, k);
  if (k > detail::kMaxNetworkClients) {  // too many for registers: element by element
    parallel_for(n, detail::kStreamGrain / 16, [&](std::size_t b, std::size_t e) {
      std::vector<std::int32_t> keys(k);
      for (std::size_t i = b; i < e; ++i) {
        detail::RobustScalar(values, k, stride, i, rule, trim.data(), out, count, keys.data());
      }
    });
    return;
  }
  detail::init_dispatch();
  const auto kernel = HWY_DYNAMIC_DISPATCH(RobustReduceF32);
  parallel_for(n, detail::kStreamGrain / 16, [&](std::size_t b, std::size_t e) {
    kernel(values, k, stride, b, e, rule, trim.data(), out, count);
  });
}

void weighted_median(const float* values, const float* weights, std::size_t k, std::size_t stride,
                     std::size_t n, float* out, std::uint32_t* count) {
  check_columns("weighted_median", values, k, stride, n, out, count);
  detail::check_pointer("weighted_median", "weights", weights, k);
  for (std::size_t j = 0; j < k; ++j) {
    if (!(weights[j] > 0.0f) || !(weights[j] - weights[j] == 0.0f)) {
      detail::fail("weighted_median: weights[", j, "] = ", weights[j], " must be finite and > 0");
    }
  }
  parallel_for(n, detail::kStreamGrain / 16, [&](std::size_t b, std::size_t e) {
    std::vector<std::pair<std::int32_t, float>> kw(k);  // (key, weight)
    for (std::size_t i = b; i < e; ++i) {
      std::size_t c = 0;
      double total = 0.0;
      for (std::size_t j = 0; j < k; ++j) {
        const float x = values[j * stride + i];
        if (x == x) {
          kw[c++] = {detail::float_key(x), weights[j]};
          total += weights[j];
        }
      }
      count[i] = static_cast<std::uint32_t>(c);
      if (c == 0) {
        out[i] = 0.0f;
        continue;
      }
      // Equal keys are equal values: their order among themselves does not matter.
      std::sort(kw.begin(), kw.begin() + static_cast<std::ptrdiff_t>(c),
                [](const auto& a, const auto& b2) { return a.first < b2.first; });
      const double half = 0.5 * total;
      double sum = 0.0;
      std::size_t at = 0;
      for (; at < c; ++at) {
        sum += kw[at].second;
        if (sum >= half) break;
      }
      const float lo = detail::key_float(kw[at].first);
      out[i] =
          sum == half && at + 1 < c ? 0.5f * lo + 0.5f * detail::key_float(kw[at + 1].first) : lo;
    }
  });
}

void closest_to_median_mean(const float* values, std::size_t k, std::size_t stride, std::size_t n,
                            std::size_t f, float* out, std::uint32_t* count) {
  check_columns("closest_to_median_mean", values, k, stride, n, out, count);
  parallel_for(n, detail::kStreamGrain / 16, [&](std::size_t b, std::size_t e) {
    std::vector<std::int32_t> keys(k);
    for (std::size_t i = b; i < e; ++i) {
      std::size_t c = 0;
      for (std::size_t j = 0; j < k; ++j) {
        const float x = values[j * stride + i];
        if (x == x) keys[c++] = detail::float_key(x);
      }
      count[i] = static_cast<std::uint32_t>(c);
      if (c == 0) {
        out[i] = 0.0f;
        continue;
      }
      std::sort(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(c));
      const float lo = detail::key_float(keys[(c - 1) / 2]), hi = detail::key_float(keys[c / 2]);
      const double median = (c & 1) ? lo : 0.5f * lo + 0.5f * hi;
      // Grow [l, r) from the middle outwards, the closer end first (a tie: the lower end).
      const std::size_t w = c > 2 * f + 1 ? c - 2 * f : 1;
      std::size_t l = c / 2, r = c / 2;
      while (r - l < w) {
        if (r == c) {
          --l;
        } else if (l == 0) {
          ++r;
        } else {
          const double below = median - detail::key_float(keys[l - 1]);
          const double above = detail::key_float(keys[r]) - median;
          if (below <= above) {
            --l;
          } else {
            ++r;
          }
        }
      }
      float sum = 0.0f;
      for (std::size_t j = l; j < r; ++j) sum += detail::key_float(keys[j]);
      out[i] = sum / static_cast<float>(w);
    }
  });
}

}  // namespace edgefuse
#endif  // HWY_ONCE
