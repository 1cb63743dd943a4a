// Index-list policies, exact rates and the budget chooser (plan/policies.h), against the
// golden vectors (FedRolex windows, FjORD widths, GQA heads, exact rational rates).
#include "edgefuse/plan/policies.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/plan/schema.h"
#include "extract_helpers.h"

using edgefuse::Rational;
using edgefuse::RollingConvention;
using V = std::vector<std::uint32_t>;

TEST_CASE("rates are exact rationals: ceil(100 x 0.07) is 7, not the double's 8") {
  CHECK(std::ceil(100 * 0.07) == 8.0);  // the pitfall itself
  CHECK(Rational::parse("0.07").count(100) == 7);
  CHECK(Rational::from_double(0.07).count(100) == 7);
  CHECK(Rational::parse("1/4").count(6) == 2);
  CHECK(Rational::parse("1/4").count(4) == 1);
  CHECK(Rational::parse("0.25").count(6) == 2);
  CHECK(Rational::parse("7e-2").count(100) == 7);
  CHECK(Rational::parse("1").count(13) == 13);
  CHECK(Rational::parse("0.0625").count(64) == 4);  // HeteroFL level e on ResNet widths
  CHECK(Rational::parse("0.0625").count(512) == 32);
  CHECK(Rational::from_double(1.0 / 3.0).count(3) == 1);  // 0.3333333333333333 * 3 < 1
  // FjORD p on a 64-channel layer: 13/26/39/52.
  CHECK(Rational::from_double(0.2).count(64) == 13);
  CHECK(Rational::from_double(0.4).count(64) == 26);
  CHECK(Rational::from_double(0.6).count(64) == 39);
  CHECK(Rational::from_double(0.8).count(64) == 52);
  // Every p = 0.01 .. 0.99 and N <= 2000 agrees with exact integer arithmetic.
  for (int p = 1; p < 100; ++p) {
    const Rational r = Rational::from_double(p / 100.0);
    for (std::uint64_t n = 1; n <= 2000; ++n) {
      REQUIRE(r.count(n) == std::max<std::uint64_t>(1, (n * p + 99) / 100));
    }
  }
}

TEST_CASE("bad rates are rejected with the text seen") {
  CHECK_THROWS_WITH_AS(Rational::parse("0"), doctest::Contains("rate '0': zero"), edgefuse::Error);
  CHECK_THROWS_WITH_AS(Rational::parse("1.5"), doctest::Contains("above 1"), edgefuse::Error);
  CHECK_THROWS_WITH_AS(Rational::parse("3/0"), doctest::Contains("zero denominator"),
                       edgefuse::Error);
  CHECK_THROWS_WITH_AS(Rational::parse("half"), doctest::Contains("not a number"), edgefuse::Error);
  CHECK_THROWS_WITH_AS(Rational::parse("0.5x"), doctest::Contains("trailing"), edgefuse::Error);
  CHECK_THROWS_AS(Rational::from_double(-0.5), edgefuse::Error);
  CHECK_THROWS_AS(Rational::from_double(std::nan("")), edgefuse::Error);
}

TEST_CASE("heterofl prefixes are the first ceil(N x rate) indices of every axis") {
  CHECK(edgefuse::prefix_indices(4, Rational::parse("0.5")) == V{0, 1});
  CHECK(edgefuse::prefix_indices(6, Rational::parse("0.5")) == V{0, 1, 2});
  CHECK(edgefuse::prefix_indices(4, Rational::parse("0.25")) == V{0});
  CHECK(edgefuse::prefix_indices(6, Rational::parse("0.25")) == V{0, 1});
}

TEST_CASE("fedrolex windows match the round-by-round table in both conventions") {
  const Rational half = Rational::parse("0.5");
  const V fwd_out[] = {{0, 1}, {1, 2}, {2, 3}, {3, 0}, {0, 1}};
  const V fwd_in[] = {{0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 0}};
  const V bwd_out[] = {{0, 1}, {3, 0}, {2, 3}, {1, 2}, {0, 1}};
  const V bwd_in[] = {{0, 1, 2}, {5, 0, 1}, {4, 5, 0}, {3, 4, 5}, {2, 3, 4}};
  for (std::uint64_t r = 0; r < 5; ++r) {
    CAPTURE(r);
    CHECK(edgefuse::rolling_window(4, half, r) == fwd_out[r]);
    CHECK(edgefuse::rolling_window(6, half, r) == fwd_in[r]);
    CHECK(edgefuse::rolling_window(4, half, r, RollingConvention::kBackward) == bwd_out[r]);
    CHECK(edgefuse::rolling_window(6, half, r, RollingConvention::kBackward) == bwd_in[r]);
  }
}

TEST_CASE("over N rounds a rolling window covers every index exactly k times") {
  for (auto conv : {RollingConvention::kForward, RollingConvention::kBackward}) {
    using Case = std::tuple<std::uint64_t, const char*, std::uint32_t>;
    for (const auto& [n, rate, k] :
         {Case{4, "0.5", 2}, Case{6, "0.5", 3}, Case{100, "0.07", 7}, Case{37, "1/3", 13}}) {
      std::vector<std::uint32_t> cover(n, 0);
      for (std::uint64_t r = 0; r < n; ++r) {
        for (auto i : edgefuse::rolling_window(n, Rational::parse(rate), r, conv)) ++cover[i];
      }
      CHECK(cover == std::vector<std::uint32_t>(n, k));
    }
  }
}

TEST_CASE("random subsets are sorted, distinct, seed-reproducible and pinned") {
  const auto a = edgefuse::random_indices(1000, Rational::parse("0.07"), 42, "hidden");
  CHECK(a.size() == 70);
  CHECK(std::is_sorted(a.begin(), a.end()));
  CHECK(std::adjacent_find(a.begin(), a.end()) == a.end());
  CHECK(a == edgefuse::random_indices(1000, Rational::parse("0.07"), 42, "hidden"));
  CHECK(a != edgefuse::random_indices(1000, Rational::parse("0.07"), 43, "hidden"));
  CHECK(a != edgefuse::random_indices(1000, Rational::parse("0.07"), 42, "mlp"));
  // Pinned: SplitMix64 + Lemire draws are fully specified, so this list is the same on every
  // platform and release; a change here breaks users' reproducibility.
  CHECK(edgefuse::random_indices(10, Rational::parse("0.3"), 7) == V{1, 6, 7});
  // Uniformity: over many seeds each index of 10 is drawn ~30% of the time.
  std::vector<int> hits(10, 0);
  for (std::uint64_t s = 0; s < 20000; ++s) {
    for (auto i : edgefuse::random_indices(10, Rational::parse("0.3"), s)) ++hits[i];
  }
  for (int h : hits) CHECK(std::abs(h - 6000) < 300);  // ~4.4 sigma
}

TEST_CASE("stride keeps the first and last layer and spreads the rest evenly") {
  CHECK(edgefuse::stride_indices(24, Rational{1, 4}) == V{0, 5, 9, 14, 18, 23});  // k = 6
  CHECK(edgefuse::stride_indices(5, Rational{3, 5}) == V{0, 2, 4});
  CHECK(edgefuse::stride_indices(4, Rational{1, 1}) == V{0, 1, 2, 3});
  CHECK(edgefuse::stride_indices(96, Rational{1, 96}) == V{0});
  CHECK(edgefuse::stride_indices(10, Rational{2, 10}) == V{0, 9});
}

TEST_CASE("staggered windows of one round cover min(N, sum k) indices") {
  const std::vector<Rational> rates{{1, 4}, {1, 4}, {1, 8}, {1, 2}};
  const auto off = edgefuse::stagger_offsets(64, rates);
  CHECK(off == std::vector<std::uint64_t>{0, 16, 32, 40});
  std::vector<bool> covered(64, false);
  for (std::size_t c = 0; c < rates.size(); ++c) {
    for (auto i : edgefuse::rolling_window(64, rates[c], 5, RollingConvention::kForward, off[c])) {
      covered[i] = true;
    }
  }
  CHECK(std::count(covered.begin(), covered.end(), true) == 64);  // 16+16+8+32 = 72 >= 64
  // Without staggering the same round covers only the largest window.
  std::vector<bool> plain(64, false);
  for (const auto& r : rates) {
    for (auto i : edgefuse::rolling_window(64, r, 5)) plain[i] = true;
  }
  CHECK(std::count(plain.begin(), plain.end(), true) == 32);
}

TEST_CASE("the budget chooser fits the budget with width and depth both cut") {
  const edgefuse::ModelConfig c = edgefuse_test::llama_config(4096, 32, 8, 128, 11008, 32000, 32);
  // Exact count of the full model (Llama-2-7B shaped, GQA 8): embeddings + lm_head + norm
  // + 32 x (q,o 4096x4096; k,v 1024x4096; 3 MLP 11008x4096; 2 norms).
  const std::uint64_t full =
      2ull * 32000 * 4096 + 4096 +
      32ull * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3ull * 11008 * 4096 + 2 * 4096);
  CHECK(edgefuse::submodel_params(c, Rational{1, 1}, 32) == full);
  // One group of eight: hidden 512, 4 q heads, 1 kv head, MLP 1376.
  CHECK(edgefuse::submodel_params(c, Rational{1, 8}, 1) ==
        2ull * 32000 * 512 + 512 +
            (2ull * 512 * 512 + 2 * 512 * 128 + 3ull * 512 * 1376 + 2 * 512));
  const auto pick = edgefuse::choose_budget(c, 100'000'000);
  CHECK(pick.params <= 100'000'000);
  // Brute force: nothing feasible is more than 5% larger.
  std::uint64_t best = 0;
  for (std::uint64_t j = 1; j <= 8; ++j) {
    for (std::uint64_t l = 1; l <= 32; ++l) {
      const auto p = edgefuse::submodel_params(c, Rational{j, 8}, l);
      if (p <= 100'000'000) best = std::max(best, p);
    }
  }
  CHECK(pick.params * 20 >= best * 19);
  CHECK(pick.layers < 32);
  CHECK(pick.width.num < pick.width.den);
  CHECK(pick.hidden == pick.width.count(4096));
  CHECK(pick.heads == pick.kv_heads * 4);
  CHECK_THROWS_WITH_AS(edgefuse::choose_budget(c, 1000), doctest::Contains("exceeds the budget"),
                       edgefuse::Error);
}
