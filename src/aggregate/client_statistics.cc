// Whole-update statistics of a round's clients and their selection (src/aggregate/
// client_statistics.h, aggregate/selection.h).
#include "src/aggregate/client_statistics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "src/aggregate/gather.h"
#include "src/aggregate/row_shape.h"
#include "src/kernels/pair_sums.h"
#include "src/plan/slicing.h"

namespace edgefuse {

double ClientStatistics::distance(std::size_t i, std::size_t j) const noexcept {
  if (i == j) return 0.0;
  const std::size_t at = i * size() + j;
  return pair_common[at] == 0 ? std::numeric_limits<double>::infinity()
                              : pair_squares[at] / static_cast<double>(pair_common[at]);
}

SelectionResult select_clients(const ClientStatistics& s, const ClientSelection& rule) {
  const std::size_t k = s.size();
  const bool bulyan = rule.rule == SelectionRule::kBulyan;
  const std::size_t need = bulyan ? 4 * rule.f + 3 : 2 * rule.f + 3;
  if (k < need) {
    detail::fail(bulyan ? "bulyan" : "multi_krum", ": f = ", rule.f, " needs at least ",
                 bulyan ? "4f + 3 = " : "2f + 3 = ", need, " clients; the round has ", k);
  }
  if (!bulyan && (rule.m < 1 || rule.m > k)) {
    detail::fail("multi_krum: m = ", rule.m, " must be in [1, ", k, "] (the round's clients)");
  }
  SelectionResult r;
  const std::size_t closest = std::max<std::size_t>(1, k - rule.f - 2);
  std::vector<double> d;
  for (std::size_t i = 0; i < k; ++i) {
    d.clear();
    for (std::size_t j = 0; j < k; ++j) {
      if (j != i) d.push_back(s.distance(i, j));
    }
    std::sort(d.begin(), d.end());
    double score = 0.0;
    for (std::size_t j = 0; j < closest; ++j) score += d[j];
    r.scores.push_back(score);
  }
  std::vector<std::size_t> order(k);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return r.scores[a] < r.scores[b]; });
  order.resize(bulyan ? k - 2 * rule.f : rule.m);
  r.selected = std::move(order);
  return r;
}

namespace {

constexpr std::size_t kStatisticsTileElements = 16384;  // fixed: the sums' grouping
constexpr std::size_t kMaxSumBytes = std::size_t{64} << 20;

// One tile's sums: per client (k) and per pair (k x k).
struct TileStatistics {
  std::vector<double> squares, pair_squares, pair_dots;
  std::vector<std::uint64_t> pair_common;
};

std::size_t tile_sum_bytes(std::size_t k, bool pairs) {
  return (k + 3 * (pairs ? k * k : 0)) * 8 + 64;
}

// The sum of x[e]·y[e] in f64 over the elements both cover, in element order.
double covered_dot(const float* x, const float* y, std::size_t n) {
  double s = 0.0;
  for (std::size_t e = 0; e < n; ++e) {
    if (!std::isnan(x[e]) && !std::isnan(y[e])) s += double(x[e]) * double(y[e]);
  }
  return s;
}

// Tiles computed together before their sums are added in order.
std::size_t tiles_per_batch(std::size_t k, bool pairs) {
  return std::clamp<std::size_t>(kMaxSumBytes / tile_sum_bytes(k, pairs), 1, 64);
}

}  // namespace

std::uint64_t client_statistics_bytes(std::size_t clients, std::size_t threads) noexcept {
  // Per thread: each client's slice of a tile plus the coverage and scatter buffers.
  const std::uint64_t per_thread = std::uint64_t{clients + 3} * kStatisticsTileElements * 4;
  return threads * per_thread + tiles_per_batch(clients, true) * tile_sum_bytes(clients, true);
}

namespace detail {

ClientStatistics compute_client_statistics(const ModelLayout& layout, ShareCache& cache,
                                           const std::vector<SubModelClient>& clients,
                                           const std::vector<LowRankClient>& low_rank, bool pairs,
                                           bool dots) {
  ClientStatistics out;
  for (const auto& c : clients) out.labels.push_back(c.label);
  for (const auto& c : low_rank) out.labels.push_back(c.label);
  const std::size_t k = out.labels.size();
  out.sum_squares.assign(k, 0.0);
  out.pair_squares.assign(pairs ? k * k : 0, 0.0);
  out.pair_common.assign(pairs ? k * k : 0, 0);
  out.pair_dots.assign(dots ? k * k : 0, 0.0);
  const std::size_t batch = tiles_per_batch(k, pairs || dots);
  std::vector<TileStatistics> partial(batch);
  for (std::size_t ti = 0; ti < layout.tensors().size(); ++ti) {
    const auto& t = layout.tensors()[ti];
    if (!is_aggregatable(t.meta.dtype)) continue;
    const std::vector<const Share*>& shares = cache.of(ti, layout, clients, low_rank);
    if (shares.empty()) continue;
    const std::vector<std::size_t> owners = cache.owners();
    const RowShape rs = row_shape(t.meta.shape);
    const std::size_t row_len = static_cast<std::size_t>(rs.row_len);
    if (row_len == 0 || rs.rows == 0) continue;
    const std::uint64_t tile_rows = std::max<std::uint64_t>(1, kStatisticsTileElements / row_len);
    const std::uint64_t tiles = (rs.rows + tile_rows - 1) / tile_rows;
    for (std::uint64_t first = 0; first < tiles; first += batch) {
      const std::size_t count =
          static_cast<std::size_t>(std::min<std::uint64_t>(batch, tiles - first));
      parallel_for(count, 1, [&](std::size_t b, std::size_t e) {
        thread_local GatherBuffers g;
        thread_local std::vector<RowSpan> spans;
        for (std::size_t i = b; i < e; ++i) {
          TileStatistics& p = partial[i];
          p.squares.assign(k, 0.0);
          p.pair_squares.assign(pairs ? k * k : 0, 0.0);
          p.pair_common.assign(pairs ? k * k : 0, 0);
          p.pair_dots.assign(dots ? k * k : 0, 0.0);
          const std::uint64_t a = (first + i) * tile_rows;
          const std::uint64_t z = std::min<std::uint64_t>(rs.rows, a + tile_rows);
          if (!locate_shares(shares, a, z, false, spans)) continue;
          const std::size_t rows = static_cast<std::size_t>(z - a), n = rows * row_len;
          gather_tile(shares, spans, ti, a, rows, row_len, g);
          for (std::size_t j = 0; j < g.present.size(); ++j) {
            const float* x = g.values.data() + j * n;
            const std::size_t cj = owners[g.present[j]];
            p.squares[cj] += square_sum(x, n);
            if (!pairs && !dots) continue;
            for (std::size_t l = j + 1; l < g.present.size(); ++l) {
              const std::size_t cl = owners[g.present[l]];
              if (cl == cj) continue;
              const float* y = g.values.data() + l * n;
              if (dots)
                p.pair_dots[std::min(cj, cl) * k + std::max(cj, cl)] += covered_dot(x, y, n);
              if (!pairs) continue;
              const PairSums ps = pair_sums(x, y, n);
              const double ds = ps.squares;
              const std::uint64_t common = ps.common;
              const std::size_t lo = std::min(cj, cl), hi = std::max(cj, cl);
              p.pair_squares[lo * k + hi] += ds;
              p.pair_common[lo * k + hi] += common;
            }
          }
        }
      });
      for (std::size_t i = 0; i < count; ++i) {
        for (std::size_t c = 0; c < k; ++c) out.sum_squares[c] += partial[i].squares[c];
        for (std::size_t at = 0; pairs && at < k * k; ++at) {
          out.pair_squares[at] += partial[i].pair_squares[at];
          out.pair_common[at] += partial[i].pair_common[at];
        }
        for (std::size_t at = 0; dots && at < k * k; ++at)
          out.pair_dots[at] += partial[i].pair_dots[at];
      }
    }
  }
  for (std::size_t i = 0; pairs && i < k; ++i) {  // symmetric
    for (std::size_t j = i + 1; j < k; ++j) {
      out.pair_squares[j * k + i] = out.pair_squares[i * k + j];
      out.pair_common[j * k + i] = out.pair_common[i * k + j];
    }
  }
  for (std::size_t i = 0; dots && i < k; ++i) {
    out.pair_dots[i * k + i] = out.sum_squares[i];
    for (std::size_t j = i + 1; j < k; ++j) out.pair_dots[j * k + i] = out.pair_dots[i * k + j];
  }
  return out;
}

}  // namespace detail
}  // namespace edgefuse
