// Tests for Krum, Multi-Krum and Bulyan (edgefuse/aggregate/selection.h and
// AggregateOptions::selection): golden scores, the whole-update statistics against a double
// recomputation from gathered index maps (clients of different coverage), the selection, the
// fused result against a round of the selected clients alone and Bulyan's coordinate rule,
// for any tile size and thread count; the errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/selection.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "llama_fixture.h"
#include "reference.h"
#include "src/kernels/pair_sums.h"

using namespace edgefuse;
using edgefuse_test::gathered_by_client;
using edgefuse_test::Llama;
using edgefuse_test::llama_plans;
using edgefuse_test::llama_updates;
using edgefuse_test::same_bytes;

namespace {

// Clients at points x_i of one dimension: pair sums (x_i - x_j)^2 over one common element.
ClientStatistics points(const std::vector<double>& x) {
  ClientStatistics s;
  const std::size_t k = x.size();
  for (std::size_t i = 0; i < k; ++i) {
    s.labels.push_back("c" + std::to_string(i));
    s.sum_squares.push_back(x[i] * x[i]);
  }
  s.pair_squares.assign(k * k, 0.0);
  s.pair_common.assign(k * k, 1);
  for (std::size_t i = 0; i < k; ++i) {
    for (std::size_t j = 0; j < k; ++j) s.pair_squares[i * k + j] = (x[i] - x[j]) * (x[i] - x[j]);
  }
  return s;
}

// Eight clients: the five sub-model plans and three whole models, the last of them updating
// 40 times as far as the others.
std::vector<std::string> eight_plans() {
  auto plans = llama_plans();
  for (int i = 0; i < 3; ++i) plans.emplace_back("{}");
  return plans;
}
const std::vector<float> kScale{1, 1, 1, 1, 1, 1, 1, 40};
constexpr std::size_t kOutlier = 7;

std::vector<NamedTensor> fuse(const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
                              const std::vector<std::string>& plans, const AggregateOptions& opt,
                              const std::vector<std::size_t>& only = {},
                              ClientStatistics* statistics = nullptr,
                              SelectionResult* selection = nullptr) {
  Aggregator agg(*m.layout, opt);
  for (std::size_t c = 0; c < ups.size(); ++c) {
    if (!only.empty() && std::find(only.begin(), only.end(), c) == only.end()) continue;
    agg.add(views_of(ups[c]), parse_plan(plans[c], *m.layout, "p"), 0.5f + static_cast<float>(c),
            "c" + std::to_string(c));
  }
  CHECK(agg.statistics() == nullptr);
  auto out = agg.finalize(views_of(m.target));
  if (statistics != nullptr) *statistics = *agg.statistics();
  if (selection != nullptr) *selection = *agg.selection();
  return out;
}

}  // namespace

TEST_CASE("pair_sums: four running sums in a fixed order, the same bits on every SIMD target") {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (const std::size_t n : {0, 1, 3, 4, 5, 8, 37, 1000}) {
    std::vector<float> x(n), y(n);
    for (std::size_t e = 0; e < n; ++e) {
      x[e] = rng() % 7 == 0 ? std::nanf("") : nd(rng);
      y[e] = rng() % 5 == 0 ? std::nanf("") : nd(rng);
    }
    // The definition: element e into sum e % 4, then (s0 + s1) + (s2 + s3).
    double s[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
    std::uint64_t common = 0;
    for (std::size_t e = 0; e < n; ++e) {
      const double d = double{x[e]} - double{y[e]};
      if (!std::isnan(d)) {
        s[e % 4] += d * d;
        ++common;
      }
      if (!std::isnan(x[e])) q[e % 4] += double{x[e]} * x[e];
    }
    edgefuse_test::for_each_simd_target([&](const std::string& target) {
      CAPTURE(target);
      CAPTURE(n);
      const detail::PairSums p = detail::pair_sums(x.data(), y.data(), n);
      CHECK(edgefuse_test::bits_of64(p.squares) ==
            edgefuse_test::bits_of64((s[0] + s[1]) + (s[2] + s[3])));
      CHECK(p.common == common);
      CHECK(edgefuse_test::bits_of64(detail::square_sum(x.data(), n)) ==
            edgefuse_test::bits_of64((q[0] + q[1]) + (q[2] + q[3])));
    });
  }
}

TEST_CASE("select_clients: Krum scores of golden points") {
  // {0, 1, 2, 3, 100}, f = 1: each score sums the k - f - 2 = 2 smallest squared distances:
  // 0: 1 + 4; 1: 1 + 1; 2: 1 + 1; 3: 1 + 4; 100: 97^2 + 98^2.
  const ClientStatistics s = points({0, 1, 2, 3, 100});
  const SelectionResult r = select_clients(s, ClientSelection{SelectionRule::kMultiKrum, 1, 2});
  CHECK(r.scores == std::vector<double>{5, 2, 2, 5, 97.0 * 97 + 98.0 * 98});
  CHECK(r.selected == std::vector<std::size_t>{1, 2});  // a tie goes to the lower index
  CHECK(select_clients(s, ClientSelection{SelectionRule::kMultiKrum, 1, 4}).selected ==
        std::vector<std::size_t>{1, 2, 0, 3});
  // f = 0 and k = 3: at least one distance (k - f - 2 = 1).
  const ClientStatistics three = points({0, 1, 5});
  CHECK(select_clients(three, ClientSelection{SelectionRule::kMultiKrum, 0, 1}).scores ==
        std::vector<double>{1, 1, 16});
  // The distance is the mean over common elements; none in common is +inf.
  ClientStatistics apart = points({0, 1, 2, 3, 100});
  apart.pair_common[0 * 5 + 4] = apart.pair_common[4 * 5 + 0] = 0;
  apart.pair_common[1 * 5 + 2] = apart.pair_common[2 * 5 + 1] = 4;
  CHECK(apart.distance(1, 2) == 0.25);
  CHECK(std::isinf(apart.distance(0, 4)));
  CHECK(select_clients(apart, ClientSelection{SelectionRule::kMultiKrum, 1, 1}).scores ==
        std::vector<double>{5, 0.25 + 1, 0.25 + 1, 5, 97.0 * 97 + 98.0 * 98});
  apart.pair_common[3 * 5 + 4] = apart.pair_common[4 * 5 + 3] = 0;
  apart.pair_common[2 * 5 + 4] = apart.pair_common[4 * 5 + 2] = 0;
  CHECK(select_clients(apart, ClientSelection{SelectionRule::kMultiKrum, 1, 1}).scores[4] ==
        std::numeric_limits<double>::infinity());
  // Bulyan keeps the k - 2f lowest scores: seven points, f = 1.
  const ClientStatistics seven = points({0, 1, 2, 3, 4, 5, 100});
  CHECK(select_clients(seven, ClientSelection{SelectionRule::kBulyan, 1, 0}).selected ==
        std::vector<std::size_t>{2, 3, 1, 4, 0});
  CHECK_THROWS_WITH_AS(select_clients(s, ClientSelection{SelectionRule::kMultiKrum, 2, 1}),
                       "multi_krum: f = 2 needs at least 2f + 3 = 7 clients; the round has 5",
                       Error);
  CHECK_THROWS_WITH_AS(select_clients(s, ClientSelection{SelectionRule::kBulyan, 1, 0}),
                       "bulyan: f = 1 needs at least 4f + 3 = 7 clients; the round has 5", Error);
  CHECK_THROWS_WITH_AS(select_clients(s, ClientSelection{SelectionRule::kMultiKrum, 1, 6}),
                       "multi_krum: m = 6 must be in [1, 5] (the round's clients)", Error);
}

TEST_CASE("multi_krum and bulyan over clients of different coverage leave the outlier out") {
  Llama m;
  const auto plans = eight_plans();
  const std::size_t k = plans.size();
  for (const AggregateMode mode : {AggregateMode::kDelta, AggregateMode::kParams}) {
    CAPTURE(mode == AggregateMode::kDelta);
    const auto ups = llama_updates(m, mode, plans, kScale);
    const auto values = gathered_by_client(m, ups, plans);
    // The statistics in double, element by element.
    std::vector<double> squares(k, 0.0), pair(k * k, 0.0);
    std::vector<std::uint64_t> common(k * k, 0);
    for (const auto& tensor : values) {
      for (const auto& v : tensor) {
        for (std::size_t i = 0; i < k; ++i) {
          if (std::isnan(v[i])) continue;
          squares[i] += double{v[i]} * v[i];
          for (std::size_t j = 0; j < k; ++j) {
            if (j == i || std::isnan(v[j])) continue;
            pair[i * k + j] += (double{v[i]} - v[j]) * (double{v[i]} - v[j]);
            ++common[i * k + j];
          }
        }
      }
    }
    AggregateOptions opt;
    opt.mode = mode;
    opt.server_lr = 0.75f;
    opt.selection = ClientSelection{SelectionRule::kMultiKrum, 1, 3};
    ClientStatistics stats;
    SelectionResult chosen;
    const auto out = fuse(m, ups, plans, opt, {}, &stats, &chosen);
    REQUIRE(stats.size() == k);
    CHECK(stats.labels[3] == "c3");
    std::vector<double> scores(k);
    for (std::size_t i = 0; i < k; ++i) {
      CAPTURE(i);
      CHECK(stats.sum_squares[i] == doctest::Approx(squares[i]).epsilon(1e-12));
      std::vector<double> d;
      for (std::size_t j = 0; j < k; ++j) {
        CHECK(stats.pair_common[i * k + j] == common[i * k + j]);
        CHECK(stats.pair_squares[i * k + j] == doctest::Approx(pair[i * k + j]).epsilon(1e-12));
        if (j != i) d.push_back(pair[i * k + j] / static_cast<double>(common[i * k + j]));
      }
      std::sort(d.begin(), d.end());
      scores[i] = std::accumulate(d.begin(), d.begin() + static_cast<std::ptrdiff_t>(k - 3), 0.0);
      CHECK(chosen.scores[i] == doctest::Approx(scores[i]).epsilon(1e-12));
    }
    std::vector<std::size_t> order(k);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return scores[a] < scores[b]; });
    CHECK(order.back() == kOutlier);
    CHECK(chosen.selected == std::vector<std::size_t>(order.begin(), order.begin() + 3));
    // The clients left out take no part: the same bytes as a round of the three alone.
    AggregateOptions plain = opt;
    plain.selection.reset();
    CHECK(same_bytes(out, fuse(m, ups, plans, plain, chosen.selected)));
    // Multi-Krum before a median: the median of the selected.
    AggregateOptions median = opt;
    median.robust = RobustAggregate{RobustRule::kMedian, 0.0};
    plain.robust = median.robust;
    CHECK(same_bytes(fuse(m, ups, plans, median), fuse(m, ups, plans, plain, chosen.selected)));

    // Bulyan, f = 1: the k - 2 = 6 lowest scores, then per element the mean of the c - 2
    // values closest to the median of the c selected clients that cover it.
    AggregateOptions bulyan = opt;
    bulyan.selection = ClientSelection{SelectionRule::kBulyan, 1, 0};
    SelectionResult six;
    const auto got = fuse(m, ups, plans, bulyan, {}, nullptr, &six);
    CHECK(six.selected == std::vector<std::size_t>(order.begin(), order.begin() + 6));
    std::uint64_t moved = 0;
    for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
      CAPTURE(m.target[ti].name);
      const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
      const auto* fused = got[ti].tensor.view().data_as<BFloat16>();
      std::size_t same = 0;
      for (std::size_t e = 0; e < values[ti].size(); ++e) {
        std::vector<float> column;
        for (const std::size_t c : six.selected) column.push_back(values[ti][e][c]);
        float r = 0.0f;
        std::uint32_t count = 0;
        closest_to_median_mean(column.data(), column.size(), 1, 1, 1, &r, &count);
        std::uint16_t want = base[e].bits;
        if (count > 0) {
          if (mode == AggregateMode::kParams) {
            want = edgefuse_test::ref_to_bf16(r);
          } else {
            const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
            volatile float inc = 0.75f * r;
            if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(b + inc);
          }
        }
        same += fused[e].bits == want ? 1 : 0;
        moved += fused[e].bits != base[e].bits ? 1 : 0;
      }
      CHECK(same == values[ti].size());
    }
    CHECK(moved > 10000);
    // Any tile size and thread count: the same statistics and bytes.
    for (const std::size_t threads : {1, 3}) {
      const ScopedNumThreads scoped(threads);
      AggregateOptions small = opt;
      small.tile_rows = 3;
      ClientStatistics again;
      CHECK(same_bytes(fuse(m, ups, plans, small, {}, &again), out));
      CHECK(again.pair_squares == stats.pair_squares);
      CHECK(again.sum_squares == stats.sum_squares);
      small.selection = bulyan.selection;
      CHECK(same_bytes(fuse(m, ups, plans, small), got));
    }
  }
}

TEST_CASE("a client selection is refused where it cannot work, naming the numbers") {
  Llama m;
  const auto ups = llama_updates(m, AggregateMode::kDelta);  // five clients
  const auto plans = llama_plans();
  AggregateOptions opt;
  opt.selection = ClientSelection{SelectionRule::kBulyan, 1, 0};
  CHECK_THROWS_WITH_AS(fuse(m, ups, plans, opt),
                       "bulyan: f = 1 needs at least 4f + 3 = 7 clients; the round has 5", Error);
  opt.selection = ClientSelection{SelectionRule::kMultiKrum, 2, 1};
  CHECK_THROWS_WITH_AS(fuse(m, ups, plans, opt),
                       "multi_krum: f = 2 needs at least 2f + 3 = 7 clients; the round has 5",
                       Error);
  opt.selection = ClientSelection{SelectionRule::kMultiKrum, 1, 0};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt), "multi_krum: m = 0 selects no client", Error);
  opt.selection = ClientSelection{SelectionRule::kBulyan, 1, 0};
  opt.robust = RobustAggregate{RobustRule::kMedian, 0.0};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt),
                       "aggregate: Bulyan has its own coordinate-wise rule; it does not take a "
                       "robust aggregate",
                       Error);
  opt.robust.reset();
  opt.finite_check = FiniteCheck::kWhileFusing;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt),
                       "aggregate: a client selection needs FiniteCheck::kOnAdd (its distances "
                       "read every value before the round)",
                       Error);
}
