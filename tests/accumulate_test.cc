// Tests for edgefuse/kernels/accumulate.h on every SIMD target: against a double-precision
// reference (tolerance) and the f32 scalar formula (bitwise), for all sizes and misaligned
// starts, plus the runs and index-list variants and their argument errors.
#include "edgefuse/kernels/accumulate.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::same_float;

namespace {

// Sizes around one, two and four vectors of the widest target (16 f32 lanes), a size that
// spans several parallel chunks (64 Ki elements each), and one above a power of two.
const std::size_t kSizes[] = {0, 1, 15, 16, 17, 53, 63, 64, 65, 1000, (1u << 17) + 3};

template <typename T>
T from_float(float f);
template <>
float from_float<float>(float f) {
  return f;
}
template <>
BFloat16 from_float<BFloat16>(float f) {
  return to_bf16(f);
}
template <>
Float16 from_float<Float16>(float f) {
  return to_f16(f);
}

double as_double(float f) { return static_cast<double>(f); }
double as_double(BFloat16 h) { return edgefuse_test::decode_bf16(h.bits); }
double as_double(Float16 h) { return edgefuse_test::decode_f16(h.bits); }

template <typename T>
std::vector<T> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(dist(rng));
  return v;
}

// acc + w * x in double; the kernel rounds twice in f32, so |err| <= 2 eps max(|ref|, 1)
// except for cancellation, which the relative bound on the two terms covers.
void check_element(float got, float acc0, double x, float w) {
  const double ref = static_cast<double>(acc0) + static_cast<double>(w) * x;
  const double scale = std::max({std::fabs(ref), std::fabs(static_cast<double>(w) * x), 1.0});
  REQUIRE(std::fabs(static_cast<double>(got) - ref) <= 2.0 * 0x1p-24 * scale);
  // Bitwise: exactly the scalar f32 formula, with no FMA.
  volatile float prod = w * static_cast<float>(x);
  REQUIRE(same_float(got, acc0 + prod));
}

template <typename T>
void dense_all_sizes(const std::string& target) {
  CAPTURE(target);
  for (std::size_t n : kSizes) {
    for (std::size_t offset : {0, 1, 3}) {
      CAPTURE(n);
      CAPTURE(offset);
      const std::vector<T> x = random_values<T>(n + offset, n * 7 + offset);
      std::vector<float> acc = random_values<float>(n + offset + 1, n + 99);
      const std::vector<float> acc0 = acc;
      const float w = 0.3125f;
      accumulate(acc.data() + offset, x.data() + offset, n, w);
      for (std::size_t i = 0; i < n; ++i) {
        check_element(acc[i + offset], acc0[i + offset], as_double(x[i + offset]), w);
      }
      for (std::size_t i = 0; i < offset; ++i) REQUIRE(acc[i] == acc0[i]);
      REQUIRE(acc[n + offset] == acc0[n + offset]);  // nothing written past n
    }
  }
}

}  // namespace

TEST_CASE("accumulate matches the references for f32, bf16 and f16 input on every target") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    dense_all_sizes<float>(target);
    dense_all_sizes<BFloat16>(target);
    dense_all_sizes<Float16>(target);
  });
}

TEST_CASE("accumulate gives identical bits on every target and thread count") {
  const std::size_t n = (1u << 18) + 7;
  const std::vector<BFloat16> x = random_values<BFloat16>(n, 1);
  const std::vector<float> acc0 = random_values<float>(n, 2);
  std::vector<float> first;
  const std::size_t saved = num_threads();
  for (std::size_t threads : {1, 2, 7}) {
    set_num_threads(threads);
    edgefuse_test::for_each_simd_target([&](const std::string& target) {
      CAPTURE(target);
      std::vector<float> acc = acc0;
      accumulate(acc.data(), x.data(), n, 0.7f);
      if (first.empty()) first = acc;
      REQUIRE(std::memcmp(acc.data(), first.data(), n * sizeof(float)) == 0);
    });
  }
  set_num_threads(saved);
}

TEST_CASE("accumulate propagates NaN and Inf from the input") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    std::vector<float> x(40, 1.0f), acc(40, 0.0f);
    x[3] = std::numeric_limits<float>::quiet_NaN();
    x[37] = std::numeric_limits<float>::infinity();
    accumulate(acc.data(), x.data(), x.size(), 2.0f);
    CHECK(std::isnan(acc[3]));
    CHECK(acc[37] == std::numeric_limits<float>::infinity());
    CHECK(acc[4] == 2.0f);
  });
}

TEST_CASE("accumulate rejects a non-finite weight, null pointers and overlap, writing nothing") {
  std::vector<float> acc(16, 1.0f), x(16, 2.0f);
  CHECK_THROWS_WITH_AS(accumulate(acc.data(), x.data(), 16, std::nanf("")),
                       "accumulate: w = nan is not finite", Error);
  CHECK_THROWS_WITH_AS(accumulate(acc.data(), x.data(), 16, std::numeric_limits<float>::infinity()),
                       "accumulate: w = inf is not finite", Error);
  CHECK_THROWS_WITH_AS(accumulate(acc.data(), static_cast<const BFloat16*>(nullptr), 16, 1.0f),
                       "accumulate: x is null but 16 elements were given", Error);
  CHECK_THROWS_AS(accumulate(acc.data(), acc.data() + 4, 8, 1.0f), Error);
  CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return v == 1.0f; }));
  CHECK_NOTHROW(accumulate(nullptr, static_cast<const float*>(nullptr), 0, 1.0f));
}

namespace {

// Scalar reference for the runs variant.
template <typename T>
std::vector<float> runs_reference(std::vector<float> acc, const std::vector<T>& x,
                                  const std::vector<Run>& runs, float w) {
  std::size_t off = 0;
  for (const Run& r : runs) {
    for (std::size_t j = 0; j < r.length; ++j) {
      volatile float prod = w * static_cast<float>(as_double(x[off + j]));
      acc[r.dst_start + j] += prod;
    }
    off += r.length;
  }
  return acc;
}

template <typename T>
void runs_case(const std::vector<Run>& runs, std::size_t acc_len) {
  std::size_t x_len = 0;
  for (const Run& r : runs) x_len += r.length;
  const std::vector<T> x = random_values<T>(x_len, x_len + 5);
  const std::vector<float> acc0 = random_values<float>(acc_len, acc_len);
  const std::vector<float> want = runs_reference(acc0, x, runs, 1.5f);
  std::vector<float> acc = acc0;
  accumulate_runs(acc.data(), acc_len, x.data(), x_len, runs.data(), runs.size(), 1.5f);
  for (std::size_t i = 0; i < acc_len; ++i) REQUIRE(same_float(acc[i], want[i]));
}

}  // namespace

TEST_CASE("accumulate_runs scatters a wrap-around window as two runs") {
  // A FedRolex window of 30 on a 100-long axis starting at 90: positions 90..99 then 0..19.
  std::vector<float> acc(100, 0.0f);
  std::vector<float> x(30);
  std::iota(x.begin(), x.end(), 1.0f);
  const Run runs[] = {{90, 10}, {0, 20}};
  accumulate_runs(acc.data(), acc.size(), x.data(), x.size(), runs, 2, 2.0f);
  CHECK(acc[90] == 2.0f);
  CHECK(acc[99] == 20.0f);
  CHECK(acc[0] == 22.0f);
  CHECK(acc[19] == 60.0f);
  CHECK(acc[20] == 0.0f);
  CHECK(acc[89] == 0.0f);
}

TEST_CASE("accumulate_runs matches the scalar reference on every target, across chunks") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    // Many short runs, runs of awkward lengths, and runs longer than a parallel chunk.
    std::vector<Run> small;
    for (std::size_t k = 0; k < 50; ++k) small.push_back({k * 20 + (k % 3), 1 + (k * 7) % 17});
    runs_case<float>(small, 1000);
    runs_case<BFloat16>(small, 1000);
    runs_case<Float16>(small, 1000);
    const std::vector<Run> big = {{300000, 70001}, {5, 65536}, {140000, 131073}};
    runs_case<BFloat16>(big, 400000);
  });
}

TEST_CASE("accumulate_runs names the run that breaks a rule and writes nothing") {
  std::vector<float> acc(100, 0.0f), x(30, 1.0f);
  auto call = [&](std::vector<Run> runs, std::size_t x_len) {
    accumulate_runs(acc.data(), acc.size(), x.data(), x_len, runs.data(), runs.size(), 1.0f);
  };
  CHECK_THROWS_WITH_AS(call({{90, 20}}, 20),
                       "accumulate_runs: runs[0] = (dst_start 90, length 20) ends past acc_len 100",
                       Error);
  CHECK_THROWS_WITH_AS(call({{0, 10}, {5, 0}}, 10),
                       "accumulate_runs: runs[1] = (dst_start 5, length 0) is empty", Error);
  CHECK_THROWS_WITH_AS(call({{0, 10}, {50, 10}}, 30),
                       "accumulate_runs: the 2 runs cover 20 elements but x_len is 30", Error);
  CHECK_THROWS_WITH_AS(call({{40, 10}, {0, 10}, {45, 10}}, 30),
                       "accumulate_runs: runs[0] = (dst_start 40, length 10) and runs[2] = "
                       "(dst_start 45, length 10) overlap in the destination",
                       Error);
  CHECK_THROWS_WITH_AS(call({{std::size_t(-1), 2}}, 2),
                       "accumulate_runs: runs[0] = (dst_start 18446744073709551615, length 2) "
                       "ends past acc_len 100",
                       Error);
  Run r{0, 10};
  CHECK_THROWS_WITH_AS(accumulate_runs(acc.data(), 100, x.data(), 10, &r, 1, std::nanf("")),
                       "accumulate_runs: w = nan is not finite", Error);
  CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return v == 0.0f; }));
  CHECK_NOTHROW(accumulate_runs(acc.data(), 100, x.data(), 0, nullptr, 0, 1.0f));
}

TEST_CASE("accumulate_indexed scatters to a random subset on every target") {
  const std::size_t acc_len = 200000;
  std::vector<std::uint32_t> perm(acc_len);
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  const std::vector<std::uint32_t> index(perm.begin(), perm.begin() + 150001);
  const std::vector<Float16> x = random_values<Float16>(index.size(), 3);
  const std::vector<float> acc0 = random_values<float>(acc_len, 4);
  std::vector<float> want = acc0;
  for (std::size_t i = 0; i < index.size(); ++i) {
    volatile float prod = -0.75f * to_f32(x[i]);
    want[index[i]] += prod;
  }
  // The same subset sorted (as plans give it), with x permuted to match.
  std::vector<std::size_t> order(index.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return index[a] < index[b]; });
  std::vector<std::uint32_t> sorted_index(index.size());
  std::vector<Float16> sorted_x(index.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    sorted_index[i] = index[order[i]];
    sorted_x[i] = x[order[i]];
  }
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    std::vector<float> acc = acc0;
    accumulate_indexed(acc.data(), acc_len, x.data(), index.data(), index.size(), -0.75f);
    REQUIRE(std::memcmp(acc.data(), want.data(), acc_len * sizeof(float)) == 0);
    acc = acc0;
    accumulate_indexed(acc.data(), acc_len, sorted_x.data(), sorted_index.data(),
                       sorted_index.size(), -0.75f);
    REQUIRE(std::memcmp(acc.data(), want.data(), acc_len * sizeof(float)) == 0);
  });
}

TEST_CASE("accumulate_indexed rejects out-of-range and repeated indices") {
  std::vector<float> acc(10, 0.0f), x(3, 1.0f);
  const std::uint32_t out_of_range[] = {1, 10, 2};
  CHECK_THROWS_WITH_AS(accumulate_indexed(acc.data(), 10, x.data(), out_of_range, 3, 1.0f),
                       "accumulate_indexed: index[1] = 10 is out of range for acc_len 10", Error);
  const std::uint32_t sorted_repeat[] = {2, 5, 5};
  CHECK_THROWS_WITH_AS(accumulate_indexed(acc.data(), 10, x.data(), sorted_repeat, 3, 1.0f),
                       "accumulate_indexed: index value 5 repeats (first at index[1]); a plan's "
                       "indices must be distinct",
                       Error);
  const std::uint32_t sorted_out_of_range[] = {2, 5, 11};
  CHECK_THROWS_WITH_AS(accumulate_indexed(acc.data(), 10, x.data(), sorted_out_of_range, 3, 1.0f),
                       "accumulate_indexed: index[2] = 11 is out of range for acc_len 10", Error);
  const std::uint32_t repeated[] = {4, 7, 4};
  CHECK_THROWS_WITH_AS(accumulate_indexed(acc.data(), 10, x.data(), repeated, 3, 1.0f),
                       "accumulate_indexed: index value 4 repeats (first at index[0]); a plan's "
                       "indices must be distinct",
                       Error);
  CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return v == 0.0f; }));
}
