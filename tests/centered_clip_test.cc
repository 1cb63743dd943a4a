// Tests for centered clipping (edgefuse/aggregate/centered_clip.h and
// AggregateOptions::centered_clip): golden one-dimensional iterations; the coefficients and
// distances against the paper's vector iteration run in double on whole updates gathered from
// index maps (sub-model clients of different coverage and one far-off whole model); the round
// against a scalar recomputation bit for bit, for any tile size and thread count; with whole
// models, the aggregate equals the vector v; the errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/centered_clip.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "llama_fixture.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::gathered_by_client;
using edgefuse_test::Llama;
using edgefuse_test::llama_plans;
using edgefuse_test::llama_updates;
using edgefuse_test::same_bytes;

namespace {

float weight_of(std::size_t c) { return 0.5f + static_cast<float>(c); }

// The Gram matrix of scalar clients x_i.
std::vector<double> gram_of(const std::vector<double>& x) {
  std::vector<double> g;
  for (const double a : x) {
    for (const double b : x) g.push_back(a * b);
  }
  return g;
}

double combination(const CenteredClipResult& r, const std::vector<double>& x) {
  double v = 0.0;
  for (std::size_t j = 0; j < x.size(); ++j) v += r.coefficients[j] * x[j];
  return v;
}

std::vector<NamedTensor> fuse(const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
                              const std::vector<std::string>& plans, const AggregateOptions& opt,
                              CenteredClipResult* result = nullptr) {
  Aggregator agg(*m.layout, opt);
  for (std::size_t c = 0; c < ups.size(); ++c) {
    agg.add(views_of(ups[c]), parse_plan(plans[c], *m.layout, "p"), weight_of(c),
            "c" + std::to_string(c));
  }
  CHECK(agg.centered_clipping() == nullptr);
  auto out = agg.finalize(views_of(m.target));
  if (result != nullptr) *result = *agg.centered_clipping();
  return out;
}

// The paper's iteration on whole-update vectors (elements a client does not cover are 0), in
// double: v <- v + sum_i p_i·c_i·(x_i - v) with c_i = min(1, tau / |x_i - v|), from v = 0.
// Returns the last distances and factors, and the coefficients a with v = sum_j a_j·x_j
// carried along.
CenteredClipResult vector_iteration(const std::vector<std::vector<std::vector<float>>>& values,
                                    std::size_t k, const CenteredClipOptions& o) {
  std::vector<std::vector<double>> x(k);
  for (const auto& tensor : values) {
    for (const auto& element : tensor) {
      for (std::size_t c = 0; c < k; ++c) {
        x[c].push_back(std::isnan(element[c]) ? 0.0 : double{element[c]});
      }
    }
  }
  const std::size_t n = x[0].size();
  double total = 0.0;
  for (std::size_t c = 0; c < k; ++c) total += weight_of(c);
  std::vector<double> v(n, 0.0);
  CenteredClipResult r;
  r.coefficients.assign(k, 0.0);
  r.distances.assign(k, 0.0);
  r.factors.assign(k, 1.0);
  for (std::size_t it = 0; it < o.iterations; ++it) {
    std::vector<double> step(n, 0.0);
    double taken = 0.0;
    for (std::size_t c = 0; c < k; ++c) {
      double d2 = 0.0;
      for (std::size_t e = 0; e < n; ++e) d2 += (x[c][e] - v[e]) * (x[c][e] - v[e]);
      r.distances[c] = std::sqrt(d2);
      r.factors[c] = std::min(1.0, o.tau / r.distances[c]);
      const double pc = weight_of(c) / total * r.factors[c];
      for (std::size_t e = 0; e < n; ++e) step[e] += pc * (x[c][e] - v[e]);
      taken += pc;
    }
    for (std::size_t e = 0; e < n; ++e) v[e] += step[e];
    for (std::size_t c = 0; c < k; ++c) {
      r.coefficients[c] = (1.0 - taken) * r.coefficients[c] + weight_of(c) / total * r.factors[c];
    }
  }
  // The coefficients carried along give v back.
  double worst = 0.0;
  for (std::size_t e = 0; e < n; ++e) {
    double s = 0.0;
    for (std::size_t c = 0; c < k; ++c) s += r.coefficients[c] * x[c][e];
    worst = std::max(worst, std::fabs(s - v[e]));
  }
  CHECK(worst < 1e-12);
  return r;
}

// The round by the fusion rule, element by element, from the Aggregator's coefficients a_j:
// weights w_j = f32(a_j), value factor s = f32(sum_j f32(a_j)); acc = sum over the covering
// clients in order of fl(fl(w·s)·x) from -0, wsum = sum of w; then W + acc / wsum in bf16.
std::size_t matching_round(const Llama& m, const std::vector<NamedTensor>& got,
                           const std::vector<std::vector<std::vector<float>>>& values,
                           const std::vector<double>& coefficients) {
  double sum = 0.0;
  for (const double a : coefficients) sum += static_cast<float>(a);
  const float s = static_cast<float>(sum);
  std::size_t same = 0;
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    const auto* g = got[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < values[ti].size(); ++e) {
      float acc = -0.0f, wsum = 0.0f;
      bool covered = false;
      for (std::size_t c = 0; c < coefficients.size(); ++c) {
        const float x = values[ti][e][c];
        if (std::isnan(x)) continue;
        const float w = static_cast<float>(coefficients[c]);
        volatile float ws = w * s;
        volatile float prod = ws * x;
        acc = acc + prod;
        wsum = wsum + w;
        covered = true;
      }
      std::uint16_t want = base[e].bits;
      if (covered) {
        const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
        volatile float q = acc / wsum;
        if (q != 0.0f) want = edgefuse_test::ref_to_bf16(b + q);
      }
      same += g[e].bits == want ? 1 : 0;
    }
  }
  return same;
}

}  // namespace

TEST_CASE("centered_clip_coefficients: golden iterations of scalar clients") {
  // Clients 1, 2 and 100 of equal weight, tau 1.5. From v = 0 the distances are 1, 2, 100,
  // the factors 1, 0.75, 0.015: v = (1 + 1.5 + 1.5) / 3 = 4/3.
  const std::vector<double> x{1, 2, 100};
  const CenteredClipResult one =
      centered_clip_coefficients(gram_of(x), {1, 1, 1}, CenteredClipOptions{1.5, 1});
  CHECK(one.distances == std::vector<double>{1, 2, 100});
  CHECK(one.factors[0] == 1.0);
  CHECK(one.factors[1] == 0.75);
  CHECK(one.factors[2] == doctest::Approx(0.015).epsilon(1e-15));
  CHECK(one.coefficients[0] == doctest::Approx(1.0 / 3).epsilon(1e-15));
  CHECK(one.coefficients[1] == doctest::Approx(0.25).epsilon(1e-15));
  CHECK(one.coefficients[2] == doctest::Approx(0.005).epsilon(1e-14));
  CHECK(combination(one, x) == doctest::Approx(4.0 / 3).epsilon(1e-14));
  // A second iteration from 4/3: distances 1/3, 2/3 (unclipped) and 296/3 (clipped to 1.5):
  // v = 4/3 + (-1/3 + 2/3 + 1.5) / 3 = 35/18.
  const CenteredClipResult two =
      centered_clip_coefficients(gram_of(x), {1, 1, 1}, CenteredClipOptions{1.5, 2});
  CHECK(two.distances[0] == doctest::Approx(1.0 / 3).epsilon(1e-12));
  CHECK(two.distances[2] == doctest::Approx(296.0 / 3).epsilon(1e-12));
  CHECK(two.factors[1] == 1.0);
  CHECK(combination(two, x) == doctest::Approx(35.0 / 18).epsilon(1e-12));
  // Weights 1, 1, 2 (p = 1/4, 1/4, 1/2): v = 1/4 + 1.5/4 + 1.5/2 = 1.375.
  const CenteredClipResult weighted =
      centered_clip_coefficients(gram_of(x), {1, 1, 2}, CenteredClipOptions{1.5, 1});
  CHECK(combination(weighted, x) == doctest::Approx(1.375).epsilon(1e-14));
  // A radius no client reaches: the weighted mean.
  const CenteredClipResult loose =
      centered_clip_coefficients(gram_of(x), {1, 1, 2}, CenteredClipOptions{1000, 3});
  CHECK(loose.coefficients == std::vector<double>{0.25, 0.25, 0.5});

  CHECK_THROWS_WITH_AS(centered_clip_coefficients(gram_of(x), {1, 1, 1}, {0.0, 1}),
                       "centered_clip: tau = 0 must be > 0 and finite", Error);
  CHECK_THROWS_WITH_AS(centered_clip_coefficients(gram_of(x), {1, 1, 1}, {1.0, 0}),
                       "centered_clip: iterations must be >= 1", Error);
  CHECK_THROWS_WITH_AS(centered_clip_coefficients({1, 2}, {1, 1, 1}, {1.0, 1}),
                       "centered_clip: a Gram matrix of 2 entries for 3 clients", Error);
  CHECK_THROWS_WITH_AS(centered_clip_coefficients(gram_of(x), {0, 0, 0}, {1.0, 1}),
                       "centered_clip: the client weights sum to 0", Error);
}

TEST_CASE("centered clipping: coefficients as the vector iteration, the round bit for bit") {
  // The five sub-model plans (spreads x1, x3, x0.2, x5, x1) and one whole model 40x off.
  Llama m;
  auto plans = llama_plans();
  plans.emplace_back("{}");
  const std::vector<float> scale{1, 3, 0.2f, 5, 1, 40};
  const auto ups = llama_updates(m, AggregateMode::kDelta, plans, scale);
  const auto values = gathered_by_client(m, ups, plans);
  const std::size_t k = plans.size();
  std::size_t elements = 0;
  for (const auto& t : values) elements += t.size();
  for (const std::size_t iterations : {1, 3}) {
    CAPTURE(iterations);
    // Unclipped distances run from about 1 (x0.2) to several hundred (x40): a radius between.
    const CenteredClipOptions o{4.0, iterations};
    const CenteredClipResult want = vector_iteration(values, k, o);
    AggregateOptions opt;
    opt.mode = AggregateMode::kDelta;
    opt.centered_clip = o;
    CenteredClipResult got;
    const auto out = fuse(m, ups, plans, opt, &got);
    REQUIRE(got.coefficients.size() == k);
    CHECK(got.labels == std::vector<std::string>{"c0", "c1", "c2", "c3", "c4", "c5"});
    std::size_t clipped = 0;
    for (std::size_t c = 0; c < k; ++c) {
      CAPTURE(c);
      CHECK(got.distances[c] == doctest::Approx(want.distances[c]).epsilon(1e-9));
      CHECK(got.factors[c] == doctest::Approx(want.factors[c]).epsilon(1e-9));
      CHECK(got.coefficients[c] == doctest::Approx(want.coefficients[c]).epsilon(1e-9));
      clipped += want.factors[c] < 1.0 ? 1 : 0;
    }
    CHECK(clipped >= 2);  // the far-off whole model and the x5 client at least
    CHECK(want.factors[5] < 0.05);
    CHECK(matching_round(m, out, values, got.coefficients) == elements);
    for (const std::size_t threads : {1, 3}) {
      const ScopedNumThreads scoped(threads);
      AggregateOptions small = opt;
      small.tile_rows = 3;
      CHECK(same_bytes(fuse(m, ups, plans, small), out));
    }
  }
}

TEST_CASE("centered clipping of whole models: the aggregate is the paper's v") {
  Llama m;
  const std::vector<std::string> plans(4, "{}");
  const auto ups = llama_updates(m, AggregateMode::kDelta, plans, {1, 2, 1, 30});
  const auto values = gathered_by_client(m, ups, plans);
  const CenteredClipOptions o{3.0, 2};
  const CenteredClipResult want = vector_iteration(values, plans.size(), o);
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.centered_clip = o;
  const auto out = fuse(m, ups, plans, opt);
  // W + v per element, within one bf16 rounding of the f32 sums.
  std::size_t close = 0, elements = 0;
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    const auto* g = out[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < values[ti].size(); ++e, ++elements) {
      double v = 0.0;
      for (std::size_t c = 0; c < plans.size(); ++c) v += want.coefficients[c] * values[ti][e][c];
      const double b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
      const double fused = edgefuse_test::float_of(std::uint32_t{g[e].bits} << 16);
      close += std::fabs(fused - (b + v)) <= std::fabs(b + v) * 0x1p-7 + 1e-30 ? 1 : 0;
    }
  }
  CHECK(close == elements);
  CHECK(want.factors[3] < 1.0);
  // A radius no client reaches: the weighted mean, bit for bit.
  AggregateOptions loose = opt;
  loose.centered_clip->tau = 1e30;
  AggregateOptions plain = opt;
  plain.centered_clip.reset();
  const auto mean = fuse(m, ups, plans, plain);
  std::size_t same = 0;
  const auto unclipped = fuse(m, ups, plans, loose);
  for (std::size_t ti = 0; ti < mean.size(); ++ti) {
    const auto* a = mean[ti].tensor.view().data_as<BFloat16>();
    const auto* b = unclipped[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < mean[ti].tensor.numel(); ++e) {
      const double x = edgefuse_test::float_of(std::uint32_t{a[e].bits} << 16);
      const double y = edgefuse_test::float_of(std::uint32_t{b[e].bits} << 16);
      same += std::fabs(x - y) <= std::fabs(x) * 0x1p-7 ? 1 : 0;
    }
  }
  CHECK(same == elements);
}

TEST_CASE("centered clipping: errors") {
  Llama m;
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.centered_clip = CenteredClipOptions{1.0, 1};
  AggregateOptions params = opt;
  params.mode = AggregateMode::kParams;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, params),
                       "aggregate: centered clipping needs AggregateMode::kDelta (it starts from "
                       "the previous aggregate, a zero delta) and FiniteCheck::kOnAdd (its Gram "
                       "matrix reads every value before the round)",
                       Error);
  AggregateOptions robust = opt;
  robust.robust = RobustAggregate{RobustRule::kMedian, 0.0};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, robust),
                       "aggregate: centered clipping is its own rule; it does not take a robust "
                       "aggregate, a client selection, norm clipping or a task merge",
                       Error);
  AggregateOptions zero = opt;
  zero.centered_clip->tau = -1.0;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, zero),
                       "centered_clip: tau = -1 must be > 0 and finite", Error);
  zero.centered_clip = CenteredClipOptions{1.0, 0};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, zero), "centered_clip: iterations must be >= 1",
                       Error);
}
