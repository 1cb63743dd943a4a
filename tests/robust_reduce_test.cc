// Tests for edgefuse/kernels/robust_reduce.h on every SIMD target: the median and trimmed mean
// on golden values, absent clients, signed zeros, and against an independent scalar
// recomputation (std::sort) for k from 1 to 65 and both rules, bit for bit; argument errors.
#include "edgefuse/kernels/robust_reduce.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::bits_of;

namespace {

const float kNaN = std::nanf("");

// The header's definition, element by element: present values in the total order of their
// bits (-0 before +0), the median or the trimmed sum (+0 added for each rank left out).
float reference(const std::vector<float>& column, RobustRule rule, double beta,
                std::uint32_t* present) {
  std::vector<float> s;
  for (const float x : column) {
    if (!std::isnan(x)) s.push_back(x);
  }
  std::sort(s.begin(), s.end(), [](float a, float b) {
    return a < b || (a == b && std::signbit(a) && !std::signbit(b));
  });
  const auto c = static_cast<std::int64_t>(s.size());
  *present = static_cast<std::uint32_t>(c);
  if (c == 0) return 0.0f;
  if (rule == RobustRule::kMedian) {
    const float lo = s[static_cast<std::size_t>((c - 1) / 2)];
    const float hi = s[static_cast<std::size_t>(c / 2)];
    return (c % 2 == 1) ? lo : 0.5f * lo + 0.5f * hi;
  }
  const auto t = static_cast<std::int64_t>(beta * static_cast<double>(c));
  float sum = 0.0f;
  for (std::size_t r = 0; r < column.size(); ++r) {
    const auto rr = static_cast<std::int64_t>(r);
    sum = sum + (rr >= t && rr < c - t ? s[r] : 0.0f);
  }
  return sum / static_cast<float>(c - 2 * t);
}

}  // namespace

TEST_CASE("robust_reduce: the median and trimmed mean of golden columns") {
  // Four elements (columns) of five clients (rows); NaN = the client does not cover it.
  const std::vector<float> v{3,    kNaN, -0.0f, 0.0f,   //
                             kNaN, kNaN, 0.0f,  -0.0f,  //
                             1,    kNaN, 0.0f,  -0.0f,  //
                             2,    kNaN, kNaN,  kNaN,   //
                             10,   kNaN, kNaN,  kNaN};
  std::vector<float> out(4);
  std::vector<std::uint32_t> count(4);
  robust_reduce(v.data(), 5, 4, 4, RobustRule::kMedian, 0.0, out.data(), count.data());
  CHECK(count == std::vector<std::uint32_t>{4, 0, 3, 3});
  CHECK(out[0] == 2.5f);  // {1, 2, 3, 10}: 0.5 * 2 + 0.5 * 3
  CHECK(out[1] == 0.0f);
  CHECK(bits_of(out[2]) == 0x00000000u);  // {-0, +0, +0}: +0
  CHECK(bits_of(out[3]) == 0x80000000u);  // {-0, -0, +0}: -0
  robust_reduce(v.data(), 5, 4, 4, RobustRule::kTrimmedMean, 0.25, out.data(), count.data());
  CHECK(out[0] == 2.5f);  // one dropped from each end of four: (2 + 3) / 2
  // beta = 0.35 of 20 values drops 7 from each end (0.35 * 20 = 7 in double; the float
  // 0.35f would give 6.99999988).
  std::vector<float> twenty(20);
  for (int j = 0; j < 20; ++j) twenty[static_cast<std::size_t>(j)] = static_cast<float>(j * j);
  float r = 0;
  std::uint32_t c = 0;
  robust_reduce(twenty.data(), 20, 1, 1, RobustRule::kTrimmedMean, 0.35, &r, &c);
  CHECK(r == (49.0f + 64 + 81 + 100 + 121 + 144) / 6.0f);
}

TEST_CASE("robust_reduce: every target equals the scalar definition bit for bit, k = 1 to 65") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    std::mt19937_64 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const std::size_t k : {1, 2, 3, 4, 7, 8, 16, 17, 64, 65}) {
      const std::size_t n = 133, stride = 141;
      std::vector<float> v(k * stride, kNaN);
      for (std::size_t j = 0; j < k; ++j) {
        for (std::size_t i = 0; i < n; ++i) {
          const auto draw = rng() % 10;
          v[j * stride + i] = draw == 0   ? kNaN
                              : draw == 1 ? 0.0f
                              : draw == 2 ? -0.0f
                              : draw == 3 ? 1.0f  // ties
                                          : normal(rng);
        }
      }
      for (const RobustRule rule : {RobustRule::kMedian, RobustRule::kTrimmedMean}) {
        for (const double beta : {0.0, 0.2, 0.35}) {
          CAPTURE(target);
          CAPTURE(k);
          CAPTURE(static_cast<int>(rule));
          CAPTURE(beta);
          std::vector<float> out(n);
          std::vector<std::uint32_t> count(n);
          robust_reduce(v.data(), k, stride, n, rule, beta, out.data(), count.data());
          std::size_t same = 0;
          for (std::size_t i = 0; i < n; ++i) {
            std::vector<float> column(k);
            for (std::size_t j = 0; j < k; ++j) column[j] = v[j * stride + i];
            std::uint32_t present = 0;
            const float want = reference(column, rule, beta, &present);
            same += bits_of(out[i]) == bits_of(want) && count[i] == present ? 1 : 0;
          }
          CHECK(same == n);
        }
      }
    }
  });
}

TEST_CASE("robust_reduce: arguments are checked before anything is written") {
  std::vector<float> v(8, 1.0f), out(4, 7.0f);
  std::vector<std::uint32_t> count(4);
  CHECK_THROWS_WITH_AS(
      robust_reduce(v.data(), 2, 4, 4, RobustRule::kTrimmedMean, 0.5, out.data(), count.data()),
      "robust_reduce: beta = 0.5 must be in [0, 0.5)", Error);
  CHECK_THROWS_WITH_AS(
      robust_reduce(v.data(), 0, 4, 4, RobustRule::kMedian, 0.0, out.data(), count.data()),
      "robust_reduce: k = 0 clients", Error);
  CHECK_THROWS_WITH_AS(
      robust_reduce(v.data(), 2, 3, 4, RobustRule::kMedian, 0.0, out.data(), count.data()),
      "robust_reduce: stride 3 is below n = 4", Error);
  CHECK_THROWS_AS(
      robust_reduce(v.data(), 2, 4, 4, RobustRule::kMedian, 0.0, v.data() + 4, count.data()),
      Error);  // out overlaps the values
  CHECK(out == std::vector<float>(4, 7.0f));
}

namespace {

// Bulyan's step by its definition: the present values' median (as above), then the w =
// max(1, c - 2f) values of smallest |x - median| (a tie to the lower value), summed in
// ascending order in f32 and divided by w.
float reference_closest(const std::vector<float>& column, std::size_t f, std::uint32_t* present) {
  std::vector<float> s;
  for (const float x : column) {
    if (!std::isnan(x)) s.push_back(x);
  }
  const auto below = [](float a, float b) {
    return a < b || (a == b && std::signbit(a) && !std::signbit(b));
  };
  std::sort(s.begin(), s.end(), below);
  const std::size_t c = s.size();
  *present = static_cast<std::uint32_t>(c);
  if (c == 0) return 0.0f;
  const double median = c % 2 ? s[(c - 1) / 2] : 0.5f * s[c / 2 - 1] + 0.5f * s[c / 2];
  std::vector<float> by_distance = s;
  std::stable_sort(by_distance.begin(), by_distance.end(), [&](float a, float b) {
    return std::fabs(static_cast<double>(a) - median) < std::fabs(static_cast<double>(b) - median);
  });
  const std::size_t w = c > 2 * f ? std::max<std::size_t>(1, c - 2 * f) : 1;
  by_distance.resize(w);
  std::sort(by_distance.begin(), by_distance.end(), below);
  float sum = 0.0f;
  for (const float x : by_distance) sum += x;
  return sum / static_cast<float>(w);
}

}  // namespace

TEST_CASE("closest_to_median_mean: golden columns and the definition for k = 1 to 65") {
  // {1, 2, 3, 10, 100} with f = 1: the 3 values closest to the median 3 are 1, 2 and 3
  // (|1 - 3| = 2 < |10 - 3| = 7).
  const std::vector<float> v{1, 2, 3, 10, 100, kNaN, 4, kNaN, 6, kNaN};
  std::vector<float> out(2);
  std::vector<std::uint32_t> count(2);
  closest_to_median_mean(v.data(), 5, 1, 1, 1, out.data(), count.data());
  CHECK(out[0] == 2.0f);
  CHECK(count[0] == 5);
  // Interleaved as two elements: {1, 3, 100, 4, 6} and {2, 10, NaN, NaN, NaN}; f = 1: element 0
  // (median 4) averages 3, 4, 6 and element 1 (c = 2, w = 1) takes the lower of its two
  // values, both 4 from the median 6.
  closest_to_median_mean(v.data(), 5, 2, 2, 1, out.data(), count.data());
  CHECK(out[0] == (3.0f + 4.0f + 6.0f) / 3.0f);
  CHECK(out[1] == 2.0f);
  CHECK(count == std::vector<std::uint32_t>{5, 2});
  // Six values with a tie at the window's edge: median 3.5 of {1, 3, 4, 6, ...}: f = 1 keeps
  // 4 of {0, 1, 3, 4, 6, 7}: 3, 4 and then 1 and 6 both 2.5 away: the lower, 1, then 6.
  const std::vector<float> six{0, 1, 3, 4, 6, 7};
  float r = 0;
  std::uint32_t c = 0;
  closest_to_median_mean(six.data(), 6, 1, 1, 1, &r, &c);
  CHECK(r == (1.0f + 3.0f + 4.0f + 6.0f) / 4.0f);
  std::mt19937_64 rng(13);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const std::size_t k : {1, 2, 3, 4, 7, 8, 16, 17, 64, 65}) {
    const std::size_t n = 133, stride = 141;
    std::vector<float> m(k * stride, kNaN);
    for (std::size_t j = 0; j < k; ++j) {
      for (std::size_t i = 0; i < n; ++i) {
        const auto draw = rng() % 10;
        m[j * stride + i] = draw == 0   ? kNaN
                            : draw == 1 ? 0.0f
                            : draw == 2 ? -0.0f
                            : draw == 3 ? 1.0f
                                        : normal(rng);
      }
    }
    for (const std::size_t f : {0, 1, 2, 5}) {
      CAPTURE(k);
      CAPTURE(f);
      std::vector<float> got(n);
      std::vector<std::uint32_t> cnt(n);
      closest_to_median_mean(m.data(), k, stride, n, f, got.data(), cnt.data());
      std::size_t same = 0;
      for (std::size_t i = 0; i < n; ++i) {
        std::vector<float> column(k);
        for (std::size_t j = 0; j < k; ++j) column[j] = m[j * stride + i];
        std::uint32_t present = 0;
        const float want = reference_closest(column, f, &present);
        same += bits_of(got[i]) == bits_of(want) && cnt[i] == present ? 1 : 0;
      }
      CHECK(same == n);
    }
  }
  CHECK_THROWS_WITH_AS(closest_to_median_mean(v.data(), 0, 2, 2, 1, out.data(), count.data()),
                       "closest_to_median_mean: k = 0 clients", Error);
}

TEST_CASE(
    "weighted_median: golden columns, equal weights give the median, integer weights the "
    "median of the repeated values") {
  const std::vector<float> v{1, 2, 3, 10};
  float r = 0;
  std::uint32_t c = 0;
  const std::vector<float> heavy_last{1, 1, 1, 5};  // W = 8: sums 1, 2, 3, 8 -> 10
  weighted_median(v.data(), heavy_last.data(), 4, 1, 1, &r, &c);
  CHECK(r == 10.0f);
  CHECK(c == 4);
  const std::vector<float> heavy_first{3, 1, 1, 1};  // W = 6: the sum 3 = W/2 -> (1 + 2) / 2
  weighted_median(v.data(), heavy_first.data(), 4, 1, 1, &r, &c);
  CHECK(r == 1.5f);
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const std::size_t k : {1, 2, 3, 5, 8, 17, 65}) {
    const std::size_t n = 97;
    std::vector<float> m(k * n), ones(k, 1.0f), w(k);
    for (auto& x : m) {
      const auto draw = rng() % 8;
      x = draw == 0 ? kNaN : draw == 1 ? 0.5f : normal(rng);  // absent clients and ties
    }
    for (auto& x : w) x = static_cast<float>(1 + rng() % 4);
    std::vector<float> got(n), want(n);
    std::vector<std::uint32_t> gc(n), wc(n);
    CAPTURE(k);
    weighted_median(m.data(), ones.data(), k, n, n, got.data(), gc.data());
    robust_reduce(m.data(), k, n, n, RobustRule::kMedian, 0.0, want.data(), wc.data());
    std::size_t same = 0;
    for (std::size_t i = 0; i < n; ++i) same += bits_of(got[i]) == bits_of(want[i]) ? 1 : 0;
    CHECK(same == n);
    CHECK(gc == wc);
    // Integer weights: client j's value repeated w_j times, then the plain median.
    weighted_median(m.data(), w.data(), k, n, n, got.data(), gc.data());
    same = 0;
    for (std::size_t i = 0; i < n; ++i) {
      std::vector<float> repeated;
      for (std::size_t j = 0; j < k; ++j) {
        for (int t = 0; t < static_cast<int>(w[j]); ++t) repeated.push_back(m[j * n + i]);
      }
      float ref = 0;
      std::uint32_t rc = 0;
      robust_reduce(repeated.data(), repeated.size(), 1, 1, RobustRule::kMedian, 0.0, &ref, &rc);
      same += bits_of(got[i]) == bits_of(ref) ? 1 : 0;
    }
    CHECK(same == n);
  }
  const std::vector<float> bad{1, 0, 1, 1};
  CHECK_THROWS_WITH_AS(weighted_median(v.data(), bad.data(), 4, 1, 1, &r, &c),
                       "weighted_median: weights[1] = 0 must be finite and > 0", Error);
}
