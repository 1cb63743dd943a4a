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
