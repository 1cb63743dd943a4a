// Tests for edgefuse/kernels/finalize.h on every SIMD target: delta and replace modes in f32,
// bf16 and f16 against the scalar f32 formula (bitwise) and a double reference (tolerance),
// uncovered elements kept bit for bit, in-place use, and argument errors. Also the private
// finalize_tally (src/kernels/tile.h): the aggregator's coverage tally and finiteness check.
#include "edgefuse/kernels/finalize.h"

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "reference.h"
#include "src/kernels/tile.h"
#include "typed_reference.h"

using namespace edgefuse;
using edgefuse_test::same_float;

namespace {

using edgefuse_test::narrow;
using edgefuse_test::raw;
using edgefuse_test::widen;
// Unit roundoff of the output type.
template <typename T>
constexpr double kUnit = std::is_same_v<T, float>      ? 0x1p-24
                         : std::is_same_v<T, BFloat16> ? 0x1p-8
                                                       : 0x1p-11;

struct Inputs {
  std::vector<float> acc, wsum;
};

Inputs make_inputs(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> val(-3.0f, 3.0f);
  std::uniform_real_distribution<float> weight(0.1f, 8.0f);
  Inputs in{std::vector<float>(n), std::vector<float>(n)};
  for (std::size_t i = 0; i < n; ++i) {
    const int kind = static_cast<int>(rng() % 8);
    in.wsum[i] = kind == 0 ? 0.0f : kind == 1 ? -1.0f : weight(rng);  // some uncovered
    in.acc[i] = val(rng) * in.wsum[i];
  }
  return in;
}

template <typename T>
void check_mode(FinalizeMode mode, std::size_t n, std::size_t offset) {
  CAPTURE(n);
  CAPTURE(offset);
  const Inputs in = make_inputs(n + offset, n + offset);
  std::mt19937_64 rng(n);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  std::vector<T> base(n + offset + 1);
  for (auto& b : base) b = narrow<T>(val(rng));
  const float lr = 0.5f;
  std::vector<T> out(n + offset + 1, narrow<T>(99.0f));
  finalize(out.data() + offset, base.data() + offset, in.acc.data() + offset,
           in.wsum.data() + offset, n, mode, lr);
  for (std::size_t i = offset; i < n + offset; ++i) {
    if (!(in.wsum[i] > 0.0f)) {
      REQUIRE(raw(out[i]) == raw(base[i]));
      continue;
    }
    volatile float q = in.acc[i] / in.wsum[i];
    volatile float step = lr * q;
    // A zero step keeps base's bits (a -0 base stays -0 under a zero delta).
    const float r =
        mode == FinalizeMode::kDelta ? (step == 0.0f ? widen(base[i]) : widen(base[i]) + step) : q;
    REQUIRE(raw(out[i]) == raw(narrow<T>(r)));  // bitwise: the scalar f32 formula, one rounding
    const double exact = mode == FinalizeMode::kDelta
                             ? widen(base[i]) + 0.5 * (static_cast<double>(in.acc[i]) / in.wsum[i])
                             : static_cast<double>(in.acc[i]) / in.wsum[i];
    REQUIRE(std::fabs(static_cast<double>(widen(out[i])) - exact) <=
            (kUnit<T> + 3 * 0x1p-24) * std::max(std::fabs(exact), 1.0));
  }
  REQUIRE(raw(out[n + offset]) == raw(narrow<T>(99.0f)));  // nothing written past n
}

template <typename T>
void all_cases() {
  for (FinalizeMode mode : {FinalizeMode::kDelta, FinalizeMode::kReplace}) {
    for (std::size_t n : {0u, 1u, 15u, 16u, 17u, 31u, 32u, 33u, 53u, 1000u, (1u << 17) + 3u}) {
      for (std::size_t offset : {0, 1}) check_mode<T>(mode, n, offset);
    }
  }
}

}  // namespace

TEST_CASE("finalize delta and replace modes match the references on every target") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    all_cases<float>();
    all_cases<BFloat16>();
    all_cases<Float16>();
  });
}

TEST_CASE("finalize keeps uncovered elements bit for bit, NaN payloads included, in place") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    const std::size_t n = 37;
    std::vector<BFloat16> w(n, BFloat16{0x3F80});  // 1.0
    std::vector<Float16> h(n, Float16{0x3C00});    // 1.0
    w[5].bits = 0x7F81;                            // signalling NaN, uncovered
    h[5].bits = 0x7C01;
    std::vector<float> acc(n, 3.0f), wsum(n, 2.0f);
    wsum[5] = 0.0f;
    wsum[6] = std::numeric_limits<float>::quiet_NaN();  // NaN weight sum: uncovered too
    finalize(w.data(), w.data(), acc.data(), wsum.data(), n, FinalizeMode::kDelta, 1.0f);
    finalize(h.data(), h.data(), acc.data(), wsum.data(), n, FinalizeMode::kDelta, 1.0f);
    CHECK(w[5].bits == 0x7F81);
    CHECK(h[5].bits == 0x7C01);
    CHECK(w[6].bits == 0x3F80);
    CHECK(w[0].bits == 0x4020);   // 1 + 3/2 = 2.5
    CHECK(h[36].bits == 0x4100);  // 2.5 in f16
  });
}

TEST_CASE("finalize with a zero delta returns the base bit for bit, -0 included") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    const std::size_t n = 37;  // vector body and scalar tail
    std::vector<float> base(n, -0.0f), out(n, 1.0f), acc(n, 0.0f), wsum(n, 2.0f);
    std::vector<BFloat16> wb(n, BFloat16{0x8000});
    base[3] = 1.5f;
    acc[4] = -0.0f;  // -0 / 2 = -0: still a zero step
    finalize(out.data(), base.data(), acc.data(), wsum.data(), n, FinalizeMode::kDelta, 0.5f);
    finalize(wb.data(), wb.data(), acc.data(), wsum.data(), n, FinalizeMode::kDelta, 1.0f);
    for (std::size_t i = 0; i < n; ++i) {
      CHECK(raw(out[i]) == raw(base[i]));
      CHECK(wb[i].bits == 0x8000);
    }
  });
}

TEST_CASE("finalize overflows to Inf in the output dtype as IEEE conversion does") {
  std::vector<Float16> out(1);
  const Float16 base{0x7BFF};  // 65504
  const float acc = 100.0f, wsum = 1.0f;
  finalize(out.data(), &base, &acc, &wsum, 1, FinalizeMode::kDelta, 1.0f);
  CHECK(out[0].bits == 0x7C00);
}

TEST_CASE("finalize rejects bad lr, null pointers and overlapping outputs, writing nothing") {
  std::vector<float> out(8, 5.0f), base(8, 1.0f), acc(8, 1.0f), wsum(8, 1.0f);
  CHECK_THROWS_WITH_AS(finalize(out.data(), base.data(), acc.data(), wsum.data(), 8,
                                FinalizeMode::kDelta, std::numeric_limits<float>::infinity()),
                       "finalize: lr = inf is not finite", Error);
  CHECK_NOTHROW(finalize(out.data(), base.data(), acc.data(), wsum.data(), 0,
                         FinalizeMode::kReplace, std::nanf("")));
  CHECK_THROWS_WITH_AS(
      finalize(out.data(), base.data(), nullptr, wsum.data(), 8, FinalizeMode::kReplace),
      "finalize: acc is null but 8 elements were given", Error);
  CHECK_THROWS_AS(
      finalize(acc.data() + 1, base.data(), acc.data(), wsum.data(), 4, FinalizeMode::kReplace),
      Error);
  CHECK_THROWS_AS(
      finalize(base.data() + 1, base.data(), acc.data(), wsum.data(), 4, FinalizeMode::kReplace),
      Error);
  CHECK_THROWS_WITH_AS(
      finalize(out.data(), base.data(), acc.data(), wsum.data(), 8, static_cast<FinalizeMode>(7)),
      "finalize: mode 7 is neither kDelta nor kReplace", Error);
  CHECK(out[0] == 5.0f);
}

namespace {

// The largest sum (with weight 1) whose result still fits T, and the smallest that does not:
// bf16 rounds to Inf from 0x7F7F8000 up, f16 from 65520 (+0.5 of the base in delta mode
// stays below it).
template <typename T>
constexpr float kFits = std::is_same_v<T, float>      ? std::numeric_limits<float>::max()
                        : std::is_same_v<T, BFloat16> ? 3.3895314e38f
                                                      : 65519.0f;
template <typename T>
constexpr float kOverflows = std::is_same_v<T, BFloat16> ? 3.3961775e38f : 65520.0f;

// finalize_tally over n elements with one special acc value at `at` (n = none) of weight
// `special_wsum`, covered or not: the flag it returns, after checking that its output equals
// finalize()'s bit for bit and that it counted the covered elements (wsum > 0). The other
// lanes hold sums whose results fit T, the largest such among them.
template <typename T>
bool flag_of(std::size_t n, std::size_t at, float special, bool covered, FinalizeMode mode,
             float special_wsum = 2.0f) {
  std::vector<float> acc(n), wsum(n);
  std::vector<T> base(n), out(n), want(n);
  for (std::size_t i = 0; i < n; ++i) {
    wsum[i] = i % 5 == 3 ? 0.0f : 1.0f + static_cast<float>(i % 3);  // some uncovered lanes
    acc[i] = i % 7 == 1 ? kFits<T> : 0.25f * static_cast<float>(i % 11);
    if (i % 7 == 1 && wsum[i] > 0.0f) wsum[i] = 1.0f;
    base[i] = narrow<T>(0.5f);
  }
  if (at < n) {
    acc[at] = special;
    wsum[at] = covered ? special_wsum : 0.0f;
  }
  finalize(want.data(), base.data(), acc.data(), wsum.data(), n, mode, 1.0f);
  const FinalizeTally tally =
      detail::finalize_tally(out.data(), base.data(), acc.data(), wsum.data(), n, mode, 1.0f);
  std::uint64_t n_covered = 0;
  for (std::size_t i = 0; i < n; ++i) {
    REQUIRE(raw(out[i]) == raw(want[i]));
    n_covered += wsum[i] > 0.0f ? 1 : 0;
  }
  REQUIRE(tally.covered == n_covered);
  return tally.nonfinite;
}

template <typename T>
void flag_cases() {
  const float inf = std::numeric_limits<float>::infinity();
  for (FinalizeMode mode : {FinalizeMode::kDelta, FinalizeMode::kReplace}) {
    for (std::size_t n : {1u, 7u, 16u, 33u, 70u}) {
      CAPTURE(n);
      REQUIRE_FALSE(flag_of<T>(n, n, 0.0f, true, mode));  // results that fit, the largest included
      for (std::size_t at = 0; at < n; ++at) {
        CAPTURE(at);
        for (float special : {std::nanf(""), inf, -inf}) {
          REQUIRE(flag_of<T>(n, at, special, true, mode));
          REQUIRE_FALSE(flag_of<T>(n, at, special, false, mode));  // uncovered: not read
        }
        // A finite sum whose result leaves T's range (it would round to Inf there).
        if constexpr (!std::is_same_v<T, float>) {
          REQUIRE(flag_of<T>(n, at, kOverflows<T>, true, mode, 1.0f));
          REQUIRE(flag_of<T>(n, at, -kOverflows<T> - 1.0f, true, mode, 1.0f));  // -1: past the base
          REQUIRE_FALSE(flag_of<T>(n, at, kFits<T>, true, mode, 1.0f));
          REQUIRE_FALSE(flag_of<T>(n, at, kOverflows<T>, false, mode, 1.0f));
        }
      }
    }
  }
}

}  // namespace

TEST_CASE(
    "finalize_tally counts covered lanes and reports a result that is NaN, Inf or out of the "
    "output range in one, and only there, on every target") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CAPTURE(target);
    flag_cases<float>();
    flag_cases<BFloat16>();
    flag_cases<Float16>();
  });
  // A long array: the one special value last of 3 Mi elements.
  const std::size_t big = 3u << 20;
  CHECK(flag_of<BFloat16>(big, big - 1, std::nanf(""), true, FinalizeMode::kReplace));
  CHECK_FALSE(flag_of<BFloat16>(big, big, 0.0f, true, FinalizeMode::kReplace));
}
