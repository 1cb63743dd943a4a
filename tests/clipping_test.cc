// Tests for norm clipping and DP-FedAvg's noise (edgefuse/aggregate/clipping.h and
// AggregateOptions::clip): Philox4x32-10's known answer through Box-Muller, the draws'
// moments, adaptive clipping's golden step; the Aggregator's norms against a double
// recomputation from gathered index maps (clients of different coverage), the clipped and
// noised round against a scalar recomputation bit for bit, for any tile size and thread count;
// the errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/clipping.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "llama_fixture.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::gathered_by_client;
using edgefuse_test::Llama;
using edgefuse_test::llama_plans;
using edgefuse_test::llama_updates;
using edgefuse_test::same_bytes;

namespace {

// Client c's weight in these rounds.
float weight_of(std::size_t c) { return 0.5f + static_cast<float>(c); }

std::vector<NamedTensor> fuse(const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
                              const AggregateOptions& opt, ClipResult* clipping = nullptr) {
  Aggregator agg(*m.layout, opt);
  const auto plans = llama_plans();
  for (std::size_t c = 0; c < ups.size(); ++c) {
    agg.add(views_of(ups[c]), parse_plan(plans[c], *m.layout, "p"), weight_of(c),
            "c" + std::to_string(c));
  }
  CHECK(agg.clipping() == nullptr);
  auto out = agg.finalize(views_of(m.target));
  if (clipping != nullptr) *clipping = *agg.clipping();
  return out;
}

// The round by its definition, element by element: acc = sum in client order of
// fl(fl(w·s)·x) from -0, wsum = sum of w; with noise, acc += wsum·(z·C/m)·ξ in f64; then
// W + 0.75·(acc / wsum) in bf16 (delta mode, server_lr 0.75).
std::vector<std::vector<std::uint16_t>> reference_round(
    const Llama& m, const std::vector<std::vector<std::vector<float>>>& values,
    const std::vector<float>& factors, const ClipOptions& clip) {
  std::vector<std::vector<std::uint16_t>> out(m.target.size());
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < values[ti].size(); ++e) {
      float acc = -0.0f, wsum = 0.0f;
      std::uint32_t count = 0;
      for (std::size_t c = 0; c < factors.size(); ++c) {
        const float x = values[ti][e][c];
        if (std::isnan(x)) continue;
        volatile float wx = weight_of(c) * factors[c];
        volatile float prod = wx * x;
        acc = acc + prod;
        wsum = wsum + weight_of(c);
        ++count;
      }
      std::uint16_t want = base[e].bits;
      if (count > 0) {
        if (clip.noise_multiplier > 0.0) {
          const double xi =
              dp_standard_normal(clip.seed, clip.round, static_cast<std::uint32_t>(ti), e);
          acc = static_cast<float>(double{acc} +
                                   double{wsum} * (clip.noise_multiplier * clip.norm / count * xi));
        }
        const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
        volatile float q = acc / wsum;
        volatile float inc = 0.75f * q;
        if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(b + inc);
      }
      out[ti].push_back(want);
    }
  }
  return out;
}

std::size_t matching(const std::vector<NamedTensor>& got,
                     const std::vector<std::vector<std::uint16_t>>& want) {
  std::size_t same = 0;
  for (std::size_t ti = 0; ti < got.size(); ++ti) {
    const auto* g = got[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < want[ti].size(); ++e) same += g[e].bits == want[ti][e] ? 1 : 0;
  }
  return same;
}

}  // namespace

TEST_CASE("dp_standard_normal: Philox4x32-10's known answer through Box-Muller, and moments") {
  // Counter and key 0: Philox4x32-10 gives 6627e8d5 e169c58d bc57ac4c 9b00dbd8 (Random123's
  // known-answer vectors). Box-Muller of u0 = 0xe169c58d6627e8d5, u1 = 0x9b00dbd8bc57ac4c:
  // a = int64(u0)·2^-63 + 2^-64 in (-1, 1), b = u1·2^-64 + 2^-65 in (0, 1),
  // r = sqrt(-2 ln b); element 0 is r·sin(πa), element 1 r·cos(πa).
  const std::uint64_t u0 = 0xe169c58d6627e8d5ull, u1 = 0x9b00dbd8bc57ac4cull;
  const double a = static_cast<double>(static_cast<std::int64_t>(u0)) * 0x1p-63 + 0x1p-64;
  const double b = static_cast<double>(u1) * 0x1p-64 + 0x1p-65;
  const double r = std::sqrt(-2.0 * std::log(b));
  const double pi = 3.14159265358979323846;
  CHECK(dp_standard_normal(0, 0, 0, 0) == doctest::Approx(r * std::sin(pi * a)).epsilon(1e-14));
  CHECK(dp_standard_normal(0, 0, 0, 1) == doctest::Approx(r * std::cos(pi * a)).epsilon(1e-14));
  CHECK(dp_standard_normal(0, 0, 0, 0) == doctest::Approx(-0.68334040568258059).epsilon(1e-14));
  // Moments of 400000 draws over elements, and each key part changes the draw.
  double sum = 0.0, squares = 0.0, fourth = 0.0;
  const std::size_t n = 400000;
  for (std::size_t e = 0; e < n; ++e) {
    const double x = dp_standard_normal(7, 3, 2, e);
    sum += x;
    squares += x * x;
    fourth += x * x * x * x;
  }
  CHECK(std::fabs(sum / n) < 0.005);            // 3 standard errors: 0.0047
  CHECK(std::fabs(squares / n - 1.0) < 0.007);  // 3 standard errors: 0.0067
  CHECK(std::fabs(fourth / n - 3.0) < 0.1);     // kurtosis 3
  CHECK(dp_standard_normal(7, 3, 2, 5) != dp_standard_normal(8, 3, 2, 5));
  CHECK(dp_standard_normal(7, 3, 2, 5) != dp_standard_normal(7, 4, 2, 5));
  CHECK(dp_standard_normal(7, 3, 2, 5) != dp_standard_normal(7, 3, 1, 5));
  CHECK(dp_standard_normal(7, 3, 2, 5) != dp_standard_normal(7, 3, 2, 4));
}

TEST_CASE("adaptive_clip_norm: C·exp(-lr·(b - quantile))") {
  // 80% unclipped against a 0.5 quantile: the norm shrinks by exp(-0.06).
  CHECK(adaptive_clip_norm(0.1, 0.2, 0.5, 0.8) == doctest::Approx(0.094176453358424872));
  CHECK(adaptive_clip_norm(0.1, 0.2, 0.5, 0.2) == doctest::Approx(0.10618365465453596));
  CHECK(adaptive_clip_norm(2.0, 0.2, 0.5, 0.5) == 2.0);
  CHECK_THROWS_WITH_AS(adaptive_clip_norm(0.0, 0.2, 0.5, 0.5), "clip: norm = 0 must be > 0", Error);
}

TEST_CASE("clipping scales each client's update by min(1, C / its norm), noise and all") {
  // Five sub-model clients of different plans and spreads (x1, x3, x0.2, x5, x1), deltas.
  Llama m;
  const auto plans = llama_plans();
  const auto ups = llama_updates(m, AggregateMode::kDelta, plans, {1.0f, 3.0f, 0.2f, 5.0f, 1.0f});
  const auto values = gathered_by_client(m, ups, plans);
  const std::size_t k = plans.size();
  std::vector<double> squares(k, 0.0);
  for (const auto& tensor : values) {
    for (const auto& v : tensor) {
      for (std::size_t c = 0; c < k; ++c) {
        if (!std::isnan(v[c])) squares[c] += double{v[c]} * v[c];
      }
    }
  }
  std::vector<double> norms(k);
  for (std::size_t c = 0; c < k; ++c) norms[c] = std::sqrt(squares[c]);
  const double C = 0.5 * (norms[0] + norms[4]);  // between the x1 clients' norms and the x3
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.server_lr = 0.75f;
  opt.clip = ClipOptions{C, 0.0, 0, 0};
  ClipResult clipped;
  const auto out = fuse(m, ups, opt, &clipped);
  std::vector<float> factors(k);
  std::size_t unclipped = 0;
  for (std::size_t c = 0; c < k; ++c) {
    CAPTURE(c);
    CHECK(clipped.norms[c] == doctest::Approx(norms[c]).epsilon(1e-12));
    factors[c] = norms[c] > C ? static_cast<float>(C / norms[c]) : 1.0f;
    unclipped += norms[c] <= C ? 1 : 0;
    CHECK(clipped.factors[c] == factors[c]);
  }
  CHECK(clipped.unclipped == unclipped);
  CHECK(factors[1] < 1.0f);
  CHECK(factors[3] < 1.0f);
  CHECK(factors[2] == 1.0f);
  std::size_t elements = 0;
  for (const auto& t : values) elements += t.size();
  CHECK(matching(out, reference_round(m, values, factors, *opt.clip)) == elements);
  // A bound no client reaches: the plain round, bit for bit.
  AggregateOptions loose = opt;
  loose.clip->norm = 1e30;
  AggregateOptions plain = opt;
  plain.clip.reset();
  CHECK(same_bytes(fuse(m, ups, loose), fuse(m, ups, plain)));

  // With noise z = 0.5, seed 42, round 3: the same by its definition, for any tile size and
  // thread count; another round draws other noise.
  AggregateOptions noisy = opt;
  noisy.clip = ClipOptions{C, 0.5, 42, 3};
  const auto with_noise = fuse(m, ups, noisy);
  CHECK(matching(with_noise, reference_round(m, values, factors, *noisy.clip)) == elements);
  CHECK_FALSE(same_bytes(with_noise, out));
  for (const std::size_t threads : {1, 3}) {
    const ScopedNumThreads scoped(threads);
    AggregateOptions small = noisy;
    small.tile_rows = 3;
    CHECK(same_bytes(fuse(m, ups, small), with_noise));
  }
  AggregateOptions next = noisy;
  next.clip->round = 4;
  CHECK_FALSE(same_bytes(fuse(m, ups, next), with_noise));

  // The median of the clipped updates: each gathered value scaled by its client's factor.
  AggregateOptions median = opt;
  median.robust = RobustAggregate{RobustRule::kMedian, 0.0};
  const auto med = fuse(m, ups, median);
  std::size_t same = 0;
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    const auto* got = med[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < values[ti].size(); ++e) {
      std::vector<float> column(k);
      for (std::size_t c = 0; c < k; ++c) {
        volatile float scaled = factors[c] * values[ti][e][c];  // fl(fl(1·s)·x)
        column[c] = scaled;
      }
      float r = 0.0f;
      std::uint32_t count = 0;
      robust_reduce(column.data(), k, 1, 1, RobustRule::kMedian, 0.0, &r, &count);
      std::uint16_t want = base[e].bits;
      if (count > 0) {
        const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
        volatile float inc = 0.75f * r;
        if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(b + inc);
      }
      same += got[e].bits == want ? 1 : 0;
    }
  }
  CHECK(same == elements);
}

TEST_CASE("clipping is refused where it cannot work") {
  Llama m;
  AggregateOptions opt;
  opt.clip = ClipOptions{1.0, 0.0, 0, 0};
  opt.mode = AggregateMode::kParams;
  CHECK_THROWS_WITH_AS(
      Aggregator(*m.layout, opt),
      "aggregate: clipping needs AggregateMode::kDelta (it bounds the norms of updates)", Error);
  opt.mode = AggregateMode::kDelta;
  opt.finite_check = FiniteCheck::kWhileFusing;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt),
                       "aggregate: clipping needs FiniteCheck::kOnAdd (its norms read every "
                       "value before the round)",
                       Error);
  opt.finite_check = FiniteCheck::kOnAdd;
  opt.clip->norm = 0.0;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt),
                       "aggregate: the clip norm 0 must be > 0 and finite", Error);
  opt.clip->norm = 1.0;
  opt.clip->noise_multiplier = -1.0;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt),
                       "aggregate: the noise multiplier -1 must be >= 0 and finite", Error);
}
