// Coverage-weighted aggregation of client updates (extract/aggregate.h).
#include "edgefuse/extract/aggregate.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <set>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/kernels/finalize.h"
#include "edgefuse/kernels/lora_update.h"
#include "edgefuse/kernels/scatter.h"
#include "src/core/finite.h"
#include "src/extract/gather.h"
#include "src/extract/slicing.h"

namespace edgefuse {

using detail::fail;

namespace {

// 64 Ki elements (768 KiB of sum, weight and count): measured best on the 1.1B aggregate_bench
// (16 Ki: -12%, 256 Ki: -6%); per-tile set-up is amortised and the tile mostly stays in L2.
constexpr std::size_t kDefaultTileElements = std::size_t{1} << 16;
constexpr std::size_t kNpos = static_cast<std::size_t>(-1);

// A target tensor as rows: dim 0 for rank >= 2, else one row.
struct RowShape {
  std::uint64_t rows, row_len;
};
RowShape row_shape(const Shape& s) {
  if (s.rank() >= 2) return {s[0], s[0] ? s.numel() / s[0] : 0};
  return {1, s.numel()};
}

struct Client {
  std::string label;
  float weight;
  Plan plan;
  std::shared_ptr<const detail::PlanLists> lists;  // built once per client
  std::vector<ConstTensorView> local;  // by layout tensor; numel 0 + null when not held
  std::vector<char> held;
  LocalRowSource rows;  // add_rows clients: local rows made on demand (local[] unused)
};

// One client's share of one target tensor.
struct Contribution {
  const Client* client;
  std::vector<std::uint32_t> trow, lrow;  // sorted by target row; empty when identity
  std::vector<ScatterRun> runs;
  std::uint64_t x_rows, x_row_len;
  bool identity = false;  // local row i is target row i for i < identity_rows
  std::uint64_t identity_rows = 0;
};

// A low-rank client's delta to one tensor (validated by add_low_rank).
struct LowRankClient {
  std::string label;
  float weight;
  std::vector<std::pair<std::size_t, LowRankDelta>> deltas;  // (layout tensor index, delta)
};

// The entries [i, e) of d.rows inside target rows [a, b); with d.rows empty (every row
// covered) a non-empty range [0, 1) when a < b.
std::pair<std::size_t, std::size_t> covered_range(const LowRankDelta& d, std::uint64_t a,
                                                  std::uint64_t b) {
  if (d.rows.empty()) return {0, a < b ? 1 : 0};
  const auto lo = std::lower_bound(d.rows.begin(), d.rows.end(), a) - d.rows.begin();
  const auto hi = std::lower_bound(d.rows.begin() + lo, d.rows.end(), b) - d.rows.begin();
  return {static_cast<std::size_t>(lo), static_cast<std::size_t>(hi)};
}
bool covers_rows(const LowRankDelta& d, std::uint64_t a, std::uint64_t b) {
  const auto [i, e] = covered_range(d, a, b);
  return i != e;
}

std::vector<TensorCoverage> fresh_report(const ModelLayout& layout) {
  std::vector<TensorCoverage> r;
  for (const auto& t : layout.tensors()) {
    TensorCoverage c;
    c.name = t.meta.name;
    c.elements = t.meta.shape.numel();
    r.push_back(std::move(c));
  }
  return r;
}

struct TileStats {
  std::uint64_t covered = 0;
  std::uint32_t min = std::numeric_limits<std::uint32_t>::max(), max = 0;
  bool any = false;
};

struct Scratch {
  std::vector<float> acc, wsum;
  std::vector<std::uint32_t> count;
  std::vector<ScatterSource> sources;
  std::vector<std::vector<std::uint32_t>> dst_rows;
  std::vector<std::vector<std::uint32_t>> src_rows;  // local rows of identity contributions
  std::vector<std::pair<std::size_t, std::size_t>> ranges;  // per contribution: its rows here
  std::vector<float> made;                                   // rows of an add_rows client
  std::vector<std::uint32_t> made_rows;                      // 0, 1, 2, ... for them
};

}  // namespace

struct Aggregator::Impl {
  ModelLayout layout;
  AggregateOptions opt;
  std::vector<Client> clients;
  std::vector<LowRankClient> low_rank;
  std::vector<TensorCoverage> report;
  std::vector<char> report_started;  // by tensor: min_contributors holds a real value
  // Contributions of the tensor last computed (built once per tensor, freed on the next).
  std::size_t work_tensor = kNpos;
  std::vector<Contribution> work;

  Impl(ModelLayout l, AggregateOptions o) : layout(std::move(l)), opt(o) {}

  void build_work(std::size_t ti);
  // Rows [r0, r1) of tensor ti from the target's rows at base_rows; coverage counted for
  // rows >= stats_from_row.
  void compute(std::size_t ti, const std::byte* base_rows, std::uint64_t r0, std::uint64_t r1,
               std::byte* out, std::uint64_t stats_from_row);
  void ensure_report();
  void check_ready() const;
  // The low-rank deltas of tensor ti with their clients' weights (built once per tensor).
  struct LowRankWork {
    const LowRankDelta* delta;
    float weight;
  };
  std::vector<LowRankWork> low_rank_work(std::size_t ti) const;
  // Adds the deltas covering rows [a, b) to a tile.
  static void add_low_rank_tile(const std::vector<LowRankWork>& work, std::uint64_t a,
                                std::uint64_t b, std::size_t row_len, float* acc, float* wsum,
                                std::uint32_t* count);
};

std::vector<Aggregator::Impl::LowRankWork> Aggregator::Impl::low_rank_work(std::size_t ti) const {
  std::vector<LowRankWork> out;
  for (const auto& c : low_rank) {
    if (c.weight == 0.0f) continue;
    for (const auto& entry : c.deltas) {
      if (entry.first == ti) out.push_back({&entry.second, c.weight});
    }
  }
  return out;
}

void Aggregator::Impl::add_low_rank_tile(const std::vector<LowRankWork>& work, std::uint64_t a,
                                         std::uint64_t b, std::size_t row_len, float* acc,
                                         float* wsum, std::uint32_t* count) {
  for (const LowRankWork& w : work) {
    const LowRankDelta& d = *w.delta;
    const auto [i, e] = covered_range(d, a, b);
    if (i == e) continue;
    const float scale = w.weight * d.scale;
    // One lora_update per run of consecutive rows [r0, r1).
    auto run = [&](std::uint64_t r0, std::uint64_t r1) {
      lora_update(acc + (r0 - a) * row_len, row_len, d.l.data() + r0 * d.rank, d.r.data(),
                  static_cast<std::size_t>(r1 - r0), row_len, d.rank, scale);
      for (std::uint64_t r = r0; r < r1; ++r) {
        float* wr = wsum + (r - a) * row_len;
        std::uint32_t* cr = count ? count + (r - a) * row_len : nullptr;
        if (d.cols.empty()) {
          for (std::size_t j = 0; j < row_len; ++j) wr[j] += w.weight;
          if (cr) for (std::size_t j = 0; j < row_len; ++j) ++cr[j];
        } else {
          for (std::uint32_t j : d.cols) wr[j] += w.weight;
          if (cr) for (std::uint32_t j : d.cols) ++cr[j];
        }
      }
    };
    if (d.rows.empty()) {
      run(a, b);
      continue;
    }
    for (std::size_t k = i; k < e;) {
      std::size_t m = k + 1;
      while (m < e && d.rows[m] == d.rows[m - 1] + 1) ++m;
      run(d.rows[k], std::uint64_t{d.rows[m - 1]} + 1);
      k = m;
    }
  }
}

void Aggregator::Impl::check_ready() const {
  if (clients.empty() && low_rank.empty()) fail("aggregate: no client update was added");
  double total = 0;
  for (const auto& c : clients) total += c.weight;
  for (const auto& c : low_rank) total += c.weight;
  if (!(total > 0)) fail("aggregate: the client weights are all zero");
}

void Aggregator::Impl::build_work(std::size_t ti) {
  if (work_tensor == ti) return;
  work.clear();
  work_tensor = ti;
  const auto& t = layout.tensors()[ti];
  const int rank = t.meta.shape.rank();
  for (const auto& c : clients) {
    if (!c.held[ti] || c.weight == 0.0f) continue;
    const auto s = detail::slice_of(layout, t, *c.lists, true);
    Contribution w{&c, {}, {}, {}, 0, 0};
    const RowShape local = row_shape(s.local_shape);
    w.x_rows = local.rows;
    w.x_row_len = local.row_len;
    // Rows.
    if (rank >= 2) {
      std::vector<std::pair<std::uint32_t, std::uint32_t>> rows;
      for (std::size_t i = 0; i < s.elems[0].size(); ++i) {
        if (s.keep[0][i]) rows.push_back({s.elems[0][i], static_cast<std::uint32_t>(i)});
      }
      std::sort(rows.begin(), rows.end());
      for (const auto& [tr, lr] : rows) {
        w.trow.push_back(tr);
        w.lrow.push_back(lr);
      }
    } else {
      w.trow = {0};
      w.lrow = {0};
    }
    // Inner positions (target offset, local offset) of dims 1.. (or dim 0 for rank 1).
    std::vector<std::pair<std::uint64_t, std::uint64_t>> inner;
    const int first = rank >= 2 ? 1 : 0;
    if (rank == 0) {
      inner.push_back({0, 0});
    } else {
      std::vector<std::uint64_t> tstride(static_cast<std::size_t>(rank), 1),
          lstride(static_cast<std::size_t>(rank), 1);
      for (int d = rank - 2; d >= first; --d) {
        tstride[d] = tstride[d + 1] * t.meta.shape[d + 1];
        lstride[d] = lstride[d + 1] * s.local_shape[d + 1];
      }
      std::vector<std::size_t> at(static_cast<std::size_t>(rank), 0);
      bool empty = false;
      for (int d = first; d < rank; ++d) empty = empty || s.elems[d].empty();
      while (!empty) {
        bool keep = true;
        std::uint64_t to = 0, lo = 0;
        for (int d = first; d < rank; ++d) {
          keep = keep && s.keep[d][at[d]];
          to += s.elems[d][at[d]] * tstride[d];
          lo += at[d] * lstride[d];
        }
        if (keep) inner.push_back({to, lo});
        int d = rank - 1;
        for (; d >= first; --d) {
          if (++at[d] < s.elems[d].size()) break;
          at[d] = 0;
        }
        if (d < first) break;
      }
    }
    std::sort(inner.begin(), inner.end());
    for (std::size_t i = 0; i < inner.size();) {
      std::size_t j = i + 1;
      while (j < inner.size() && inner[j].first == inner[j - 1].first + 1 &&
             inner[j].second == inner[j - 1].second + 1) {
        ++j;
      }
      w.runs.push_back({inner[i].first, inner[i].second, j - i});
      i = j;
    }
    if (w.trow.empty() || w.runs.empty()) continue;  // masked out entirely
    // Every row in place (a full axis such as the vocabulary): no lists, which for a
    // thousand clients of a 32000-row embedding would be 256 MB.
    bool same = true;
    for (std::size_t i = 0; i < w.trow.size() && same; ++i) same = w.trow[i] == i && w.lrow[i] == i;
    if (same) {
      w.identity = true;
      w.identity_rows = w.trow.size();
      w.trow = {};
      w.lrow = {};
    }
    work.push_back(std::move(w));
  }
}

void Aggregator::Impl::compute(std::size_t ti, const std::byte* base_rows, std::uint64_t r0,
                               std::uint64_t r1, std::byte* out, std::uint64_t stats_from_row) {
  const auto& t = layout.tensors()[ti];
  const RowShape rs = row_shape(t.meta.shape);
  const std::size_t esize = static_cast<std::size_t>(dtype_bytes(t.meta.dtype, 1));
  TensorCoverage& cov = report[ti];
  if (!detail::is_aggregatable(t.meta.dtype)) {
    if (out != base_rows) std::memmove(out, base_rows, (r1 - r0) * rs.row_len * esize);
    return;
  }
  build_work(ti);
  const std::uint64_t tile_rows =
      opt.tile_rows ? opt.tile_rows
                    : std::max<std::uint64_t>(1, (opt.tile_elements ? opt.tile_elements
                                                                    : kDefaultTileElements) /
                                                     std::max<std::uint64_t>(rs.row_len, 1));
  const std::uint64_t n_rows = r1 - r0;
  const std::size_t num_tiles = static_cast<std::size_t>((n_rows + tile_rows - 1) / tile_rows);
  std::vector<TileStats> stats(num_tiles);
  const bool counts = opt.coverage_counts;
  const FinalizeMode mode =
      opt.mode == AggregateMode::kDelta ? FinalizeMode::kDelta : FinalizeMode::kReplace;
  const std::vector<LowRankWork> lr_work = low_rank_work(ti);
  parallel_for(num_tiles, 1, [&](std::size_t tb, std::size_t te) {
    thread_local Scratch sc;
    for (std::size_t tile = tb; tile < te; ++tile) {
      const std::uint64_t a = r0 + tile * tile_rows, b = std::min(r1, a + tile_rows);
      const std::size_t rows = static_cast<std::size_t>(b - a);
      const std::size_t n = rows * static_cast<std::size_t>(rs.row_len);
      sc.ranges.resize(work.size());
      bool any = false;
      for (std::size_t k = 0; k < work.size(); ++k) {
        const Contribution& w = work[k];
        std::size_t lo, hi;
        if (w.identity) {
          lo = static_cast<std::size_t>(std::min<std::uint64_t>(a, w.identity_rows));
          hi = static_cast<std::size_t>(std::min<std::uint64_t>(b, w.identity_rows));
        } else {
          lo = static_cast<std::size_t>(std::lower_bound(w.trow.begin(), w.trow.end(), a) - w.trow.begin());
          hi = static_cast<std::size_t>(std::lower_bound(w.trow.begin() + lo, w.trow.end(), b) - w.trow.begin());
        }
        sc.ranges[k] = {lo, hi};
        any = any || lo != hi;
      }
      const std::byte* bt = base_rows + (a - r0) * rs.row_len * esize;
      std::byte* ot = out + (a - r0) * rs.row_len * esize;
      TileStats& st = stats[tile];
      const std::uint64_t from = std::max(a, stats_from_row);
      bool low_rank_here = false;
      for (const LowRankWork& w : lr_work) low_rank_here = low_rank_here || covers_rows(*w.delta, a, b);
      if (!any && !low_rank_here) {  // no client reaches this tile: it keeps its bits
        if (ot != bt) std::memcpy(ot, bt, n * esize);
        if (from < b) {
          st.any = true;
          st.min = 0;
        }
        continue;
      }
      // Sub-model clients first, then the low-rank ones: a fixed order for every element.
      sc.acc.assign(n, -0.0f);  // -0 is the identity of +: a lone -0 contribution stays -0
      sc.wsum.assign(n, 0.0f);
      if (counts) sc.count.assign(n, 0u);
      // Sources in client order; an add_rows client's rows are made into scratch, so the
      // sources before it are added first (per element the order of additions is the same).
      auto flush = [&] {
        if (sc.sources.empty()) return;
        scatter_accumulate(sc.acc.data(), sc.wsum.data(), counts ? sc.count.data() : nullptr,
                           rows, static_cast<std::size_t>(rs.row_len), sc.sources.data(),
                           sc.sources.size());
        sc.sources.clear();
      };
      sc.sources.clear();
      if (sc.dst_rows.size() < work.size()) sc.dst_rows.resize(work.size());
      if (sc.src_rows.size() < work.size()) sc.src_rows.resize(work.size());
      for (std::size_t k = 0; k < work.size(); ++k) {
        const auto [lo, hi] = sc.ranges[k];
        if (lo == hi) continue;
        const Contribution& w = work[k];
        auto& dst = sc.dst_rows[k];
        dst.resize(hi - lo);
        const std::uint32_t* lrow = nullptr;
        if (w.identity) {
          auto& src = sc.src_rows[k];
          src.resize(hi - lo);
          for (std::size_t r = lo; r < hi; ++r) {
            dst[r - lo] = static_cast<std::uint32_t>(r - a);
            src[r - lo] = static_cast<std::uint32_t>(r);
          }
          lrow = src.data();
        } else {
          for (std::size_t r = lo; r < hi; ++r) dst[r - lo] = static_cast<std::uint32_t>(w.trow[r] - a);
          lrow = w.lrow.data() + lo;
        }
        if (w.client->rows) {
          flush();
          sc.made.resize((hi - lo) * static_cast<std::size_t>(w.x_row_len));
          sc.made_rows.resize(hi - lo);
          for (std::size_t r = 0; r < hi - lo; ++r) sc.made_rows[r] = static_cast<std::uint32_t>(r);
          w.client->rows(ti, lrow, hi - lo, static_cast<std::size_t>(w.x_row_len),
                         sc.made.data());
          sc.sources.push_back({sc.made.data(), DType::kF32, hi - lo, w.x_row_len, dst.data(),
                                sc.made_rows.data(), dst.size(), w.runs.data(), w.runs.size(),
                                w.client->weight});
          flush();
          continue;
        }
        const ConstTensorView& x = w.client->local[ti];
        sc.sources.push_back({x.bytes(), x.dtype(), w.x_rows, w.x_row_len, dst.data(),
                              lrow, dst.size(), w.runs.data(), w.runs.size(),
                              w.client->weight});
      }
      flush();
      if (low_rank_here) {
        add_low_rank_tile(lr_work, a, b, static_cast<std::size_t>(rs.row_len), sc.acc.data(),
                          sc.wsum.data(), counts ? sc.count.data() : nullptr);
      }
      switch (t.meta.dtype) {
        case DType::kF32:
          edgefuse::finalize(reinterpret_cast<float*>(ot), reinterpret_cast<const float*>(bt),
                   sc.acc.data(), sc.wsum.data(), n, mode, opt.server_lr);
          break;
        case DType::kBF16:
          edgefuse::finalize(reinterpret_cast<BFloat16*>(ot), reinterpret_cast<const BFloat16*>(bt),
                   sc.acc.data(), sc.wsum.data(), n, mode, opt.server_lr);
          break;
        default:
          edgefuse::finalize(reinterpret_cast<Float16*>(ot), reinterpret_cast<const Float16*>(bt),
                   sc.acc.data(), sc.wsum.data(), n, mode, opt.server_lr);
          break;
      }
      // Coverage of the rows not counted yet.
      if (from < b) {
        const std::size_t i0 = static_cast<std::size_t>((from - a) * rs.row_len);
        st.any = true;
        if (counts) {
          const CoverageStats cs = coverage_stats(sc.count.data() + i0, n - i0);
          st.covered = cs.covered;
          st.min = cs.min;
          st.max = cs.max;
        } else {
          st.covered = count_positive(sc.wsum.data() + i0, n - i0);
          st.min = st.covered == n - i0 ? 1u : 0u;
          st.max = st.covered != 0 ? 1u : 0u;
        }
      }
    }
  });
  for (const auto& st : stats) {
    if (!st.any) continue;
    cov.covered += st.covered;
    cov.min_contributors = report_started[ti] ? std::min(cov.min_contributors, st.min) : st.min;
    report_started[ti] = 1;
    cov.max_contributors = std::max(cov.max_contributors, st.max);
  }
}

Aggregator::Aggregator(ModelLayout target, AggregateOptions options)
    : impl_(std::make_unique<Impl>(std::move(target), options)) {
  if (!(options.server_lr - options.server_lr == 0.0f)) {
    fail("aggregate: server_lr = ", options.server_lr, " is not finite");
  }
  if (options.mode != AggregateMode::kParams && options.mode != AggregateMode::kDelta) {
    fail("aggregate: unknown mode ", static_cast<int>(options.mode));
  }
}
Aggregator::Aggregator(Aggregator&&) noexcept = default;
Aggregator& Aggregator::operator=(Aggregator&&) noexcept = default;
Aggregator::~Aggregator() = default;

std::size_t Aggregator::num_clients() const noexcept {
  return impl_->clients.size() + impl_->low_rank.size();
}

void Aggregator::add_low_rank(std::vector<LowRankDelta> deltas, float weight, std::string label) {
  const auto where = [&]() { return label + ": "; };
  if (impl_->opt.mode != AggregateMode::kDelta) {
    fail(where(), "low-rank (LoRA) updates are deltas; the aggregation mode must be delta");
  }
  if (!(weight >= 0.0f) || !(weight - weight == 0.0f)) {
    fail(where(), "weight ", weight, " must be finite and >= 0 (client rejected)");
  }
  LowRankClient c{label, weight, {}};
  const auto& tensors = impl_->layout.tensors();
  for (auto& d : deltas) {
    const ModelLayout::Tensor* found = impl_->layout.find(d.tensor);
    if (found == nullptr) fail(where(), "tensor '", d.tensor, "' is not in the target (client rejected)");
    const auto ti = static_cast<std::size_t>(found - tensors.data());
    for (const auto& [t, other] : c.deltas) {
      if (t == ti) fail(where(), "tensor '", d.tensor, "' given twice (client rejected)");
    }
    const auto& meta = tensors[ti].meta;
    if (meta.shape.rank() != 2 || !detail::is_aggregatable(meta.dtype)) {
      fail(where(), "tensor '", d.tensor, "' is ", meta.shape.to_string(), " ",
           dtype_name(meta.dtype), "; a low-rank delta needs a 2-d float weight (client rejected)");
    }
    const std::uint64_t rows = meta.shape[0], cols = meta.shape[1];
    if (d.l.size() != rows * d.rank || d.r.size() != d.rank * cols) {
      fail(where(), "tensor '", d.tensor, "': factors of ", d.l.size(), " and ", d.r.size(),
           " values do not make a rank-", d.rank, " update of ", meta.shape.to_string(),
           " (client rejected)");
    }
    if (!(d.scale - d.scale == 0.0f)) {
      fail(where(), "tensor '", d.tensor, "': scale ", d.scale, " is not finite (client rejected)");
    }
    for (const auto* v : {&d.l, &d.r}) {
      const std::size_t bad = detail::first_nonfinite(
          ConstTensorView(v->data(), DType::kF32, Shape{v->size()}));
      if (bad != detail::kNoIndex) {
        fail(where(), "tensor '", d.tensor, "': a factor holds a non-finite value at element ",
             bad, " (client rejected)");
      }
    }
    auto check_list = [&](const std::vector<std::uint32_t>& v, std::uint64_t n, const char* what) {
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (v[i] >= n || (i > 0 && v[i] <= v[i - 1])) {
          fail(where(), "tensor '", d.tensor, "': covered ", what, " must be sorted, distinct and < ",
               n, " (client rejected)");
        }
      }
    };
    check_list(d.rows, rows, "rows");
    check_list(d.cols, cols, "columns");
    c.deltas.emplace_back(ti, std::move(d));
  }
  impl_->low_rank.push_back(std::move(c));
}
void Aggregator::add_rows(Plan plan, float weight, std::string label, LocalRowSource rows) {
  const ModelLayout& layout = impl_->layout;
  if (!(weight - weight == 0.0f) || weight < 0.0f) {
    fail(label, ": client weight ", weight, " is negative or not finite");
  }
  if (!rows) fail(label, ": no row source given");
  validate_plan(plan, layout, label + ": plan");
  Client c{label, weight, plan, std::make_shared<const detail::PlanLists>(layout, plan), {}, {}, std::move(rows)};
  c.local.resize(layout.tensors().size());
  c.held.assign(layout.tensors().size(), 0);
  for (const auto& ct : detail::client_tensors(layout, *c.lists, std::nullopt)) {
    if (detail::is_aggregatable(layout.tensors()[ct.target_index].meta.dtype)) {
      c.held[ct.target_index] = 1;
    }
  }
  impl_->clients.push_back(std::move(c));
  impl_->work_tensor = kNpos;
}

void Aggregator::Impl::ensure_report() {
  if (report.size() == layout.tensors().size()) return;
  report = fresh_report(layout);
  report_started.assign(layout.tensors().size(), 0);
}

void Aggregator::compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                              std::uint64_t r1, std::byte* out) {
  impl_->check_ready();
  const auto& tensors = impl_->layout.tensors();
  if (tensor >= tensors.size()) fail("compute_rows: tensor ", tensor, " of ", tensors.size());
  const RowShape rs = row_shape(tensors[tensor].meta.shape);
  if (r0 > r1 || r1 > rs.rows) {
    fail("compute_rows: rows [", r0, ", ", r1, ") of '", tensors[tensor].meta.name, "' with ", rs.rows, " rows");
  }
  if (r0 == r1) return;
  if (base_rows == nullptr || out == nullptr) fail("compute_rows: null rows");
  impl_->ensure_report();
  impl_->compute(tensor, base_rows, r0, r1, out, r0);
}

const ModelLayout& Aggregator::layout() const noexcept { return impl_->layout; }
const std::vector<TensorCoverage>& Aggregator::report() const noexcept { return impl_->report; }

void Aggregator::add(NamedViews update, Plan plan, float weight, std::string label) {
  const ModelLayout& layout = impl_->layout;
  if (!(weight - weight == 0.0f) || weight < 0.0f) {
    fail(label, ": client weight ", weight, " is negative or not finite");
  }
  validate_plan(plan, layout, label + ": plan");
  std::map<std::string_view, const ConstTensorView*> by_name;
  for (const auto& v : update) {
    if (!by_name.emplace(v.name, &v.view).second) {
      fail(label, ": tensor '", v.name, "' appears twice in the update");
    }
  }
  Client c{label, weight, plan, std::make_shared<const detail::PlanLists>(layout, plan), {}, {}, {}};
  c.local.resize(layout.tensors().size());
  c.held.assign(layout.tensors().size(), 0);
  std::set<std::string> used;
  for (const auto& ct : detail::client_tensors(layout, *c.lists, std::nullopt)) {
    auto it = by_name.find(ct.name);
    if (it == by_name.end()) {
      fail(label, ": tensor '", ct.name, "' is missing (the plan gives it shape ",
           ct.shape.to_string(), ")");
    }
    const ConstTensorView& v = *it->second;
    if (v.shape() != ct.shape) {
      fail(label, ": tensor '", ct.name, "' has shape ", v.shape().to_string(),
           " but the plan gives ", ct.shape.to_string());
    }
    const DType target_dtype = layout.tensors()[ct.target_index].meta.dtype;
    if (detail::is_aggregatable(target_dtype) ? !detail::is_aggregatable(v.dtype())
                                              : v.dtype() != target_dtype) {
      fail(label, ": tensor '", ct.name, "' has dtype ", dtype_name(v.dtype()),
           detail::is_aggregatable(target_dtype)
               ? std::string("; updates must be F32, BF16 or F16")
               : "; expected the target's " + std::string(dtype_name(target_dtype)));
    }
    if (const std::size_t bad = detail::first_nonfinite(v); bad != detail::kNoIndex) {
      fail(label, ": tensor '", ct.name, "' holds a non-finite value at element ", bad,
           " (client rejected)");
    }
    c.local[ct.target_index] = v;
    c.held[ct.target_index] = 1;
    used.insert(ct.name);
  }
  for (const auto& v : update) {
    if (used.count(v.name) == 0) {
      fail(label, ": tensor '", v.name, "' is not part of this client's plan (extra tensor)");
    }
  }
  impl_->clients.push_back(std::move(c));
  impl_->work_tensor = kNpos;
}

std::vector<TensorCoverage> Aggregator::finalize(const NamedViews& target,
                                                 const std::vector<TensorView>& out) {
  impl_->check_ready();
  const ModelLayout& layout = impl_->layout;
  if (out.size() != layout.tensors().size()) {
    fail("aggregate: ", out.size(), " output views for ", layout.tensors().size(), " tensors");
  }
  const auto by_name = detail::index_views(target);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const auto& t = layout.tensors()[i];
    detail::find_target(by_name, t);
    if (out[i].shape() != t.meta.shape || out[i].dtype() != t.meta.dtype) {
      fail("aggregate: output view ", i, " for '", t.meta.name, "' is ", dtype_name(out[i].dtype()),
           " ", out[i].shape().to_string(), ", expected ", dtype_name(t.meta.dtype), " ",
           t.meta.shape.to_string());
    }
  }
  impl_->report = fresh_report(layout);
  impl_->report_started.assign(layout.tensors().size(), 0);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const ConstTensorView& base = detail::find_target(by_name, layout.tensors()[i]);
    const auto rows = row_shape(base.shape()).rows;
    impl_->compute(i, base.bytes(), 0, rows, out[i].bytes(), 0);
  }
  impl_->work.clear();
  impl_->work_tensor = kNpos;
  return impl_->report;
}

std::vector<NamedTensor> Aggregator::finalize(const NamedViews& target,
                                              std::vector<TensorCoverage>* report) {
  std::vector<NamedTensor> out;
  std::vector<TensorView> views;
  for (const auto& t : impl_->layout.tensors()) {
    out.push_back({t.meta.name, Tensor::empty(t.meta.dtype, t.meta.shape)});
    views.push_back(out.back().tensor.view());
  }
  auto r = finalize(target, views);
  if (report) *report = std::move(r);
  return out;
}

void Aggregator::finalize_to(CheckpointWriter& writer, const NamedViews& target) {
  impl_->check_ready();
  const ModelLayout& layout = impl_->layout;
  const auto by_name = detail::index_views(target);
  impl_->report = fresh_report(layout);
  impl_->report_started.assign(layout.tensors().size(), 0);
  for (std::size_t i = 0; i < layout.tensors().size(); ++i) {
    const auto& t = layout.tensors()[i];
    const ConstTensorView base = detail::find_target(by_name, t);
    const RowShape rs = row_shape(t.meta.shape);
    const std::size_t row_bytes =
        static_cast<std::size_t>(dtype_bytes(t.meta.dtype, rs.row_len));
    Impl* impl = impl_.get();
    auto watermark = std::make_shared<std::uint64_t>(0);
    auto scratch = std::make_shared<std::vector<std::byte>>();
    auto produce = [impl, i, base, row_bytes, watermark, scratch](
                       std::uint64_t offset, std::byte* dst, std::size_t len) {
      if (row_bytes == 0 || len == 0) return;
      const std::uint64_t r0 = offset / row_bytes;
      const std::uint64_t r1 = (offset + len + row_bytes - 1) / row_bytes;
      if (offset % row_bytes == 0 && len % row_bytes == 0) {
        impl->compute(i, base.bytes() + r0 * row_bytes, r0, r1, dst, *watermark);
      } else {
        scratch->resize(static_cast<std::size_t>((r1 - r0) * row_bytes));
        impl->compute(i, base.bytes() + r0 * row_bytes, r0, r1, scratch->data(), *watermark);
        std::memcpy(dst, scratch->data() + (offset - r0 * row_bytes), len);
      }
      *watermark = std::max(*watermark, r1);
    };
    writer.add(t.meta.name, t.meta.dtype, t.meta.shape, std::move(produce));
  }
}

}  // namespace edgefuse
