// Coverage-weighted aggregation of client updates (extract/aggregate.h).
#include "edgefuse/extract/aggregate.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <string>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/kernels/finalize.h"
#include "edgefuse/kernels/lora_update.h"
#include "edgefuse/kernels/scatter.h"
#include "src/core/finite.h"
#include "src/extract/gather.h"
#include "src/extract/slicing.h"
#include "src/kernels/tile.h"

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
  bool pending = false;  // FiniteCheck::kWhileFusing: values not scanned yet
};

// One client's tensors to scan for NaN and Inf, in the order they are reported.
struct ScanJob {
  const std::string* label;
  std::vector<std::pair<std::string_view, const ConstTensorView*>> tensors;
};

// Scans the jobs' tensors in parallel pieces; per job, add()'s message for its first NaN or
// Inf value in the order given, or "" when it holds none.
std::vector<std::string> nonfinite_faults(const std::vector<ScanJob>& jobs) {
  struct Piece {
    std::size_t job, tensor, begin, end;
  };
  constexpr std::size_t kPiece = std::size_t{1} << 18;
  std::vector<Piece> pieces;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    for (std::size_t i = 0; i < jobs[j].tensors.size(); ++i) {
      const auto n = static_cast<std::size_t>(jobs[j].tensors[i].second->numel());
      for (std::size_t b = 0; b < n; b += kPiece) pieces.push_back({j, i, b, std::min(n, b + kPiece)});
    }
  }
  std::vector<std::size_t> bad(pieces.size(), detail::kNoIndex);
  parallel_for(pieces.size(), 1, [&](std::size_t b, std::size_t e) {
    for (std::size_t k = b; k < e; ++k) {
      const Piece& p = pieces[k];
      bad[k] = detail::first_nonfinite(*jobs[p.job].tensors[p.tensor].second, p.begin, p.end);
    }
  });
  std::vector<std::string> fault(jobs.size());
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const Piece& p = pieces[k];
    if (bad[k] == detail::kNoIndex || !fault[p.job].empty()) continue;
    fault[p.job] = detail::concat(*jobs[p.job].label, ": tensor '", jobs[p.job].tensors[p.tensor].first,
                                  "' holds a non-finite value at element ", p.begin + bad[k],
                                  " (client rejected)");
  }
  return fault;
}

// One client's share of one target tensor.
struct Contribution {
  const Client* client;
  std::vector<std::uint32_t> trow, lrow;  // sorted by target row; empty when identity
  std::vector<ScatterRun> runs;
  std::uint64_t x_rows, x_row_len;
  bool identity = false;  // local row i is target row i for i < identity_rows
  std::uint64_t identity_rows = 0;
};

// A low-rank delta checked and laid out for the tile loop: R is cut into one block per run
// of consecutive covered columns (rank x len each, row-major), so every (row run, column run)
// pair is one lora_update on the tile.
struct ColumnRun {
  std::uint32_t c0, len;
  std::size_t r_offset;  // of the run's block in PreparedDelta::r
};
struct PreparedDelta {
  std::size_t tensor = 0;  // layout index
  std::size_t rank = 0;
  float scale = 1.0f;
  std::vector<std::uint32_t> rows;  // covered target rows, sorted; empty = all
  std::vector<float> l;             // one row of `rank` values per covered row
  std::vector<ColumnRun> col_runs;
  std::vector<float> r;
  std::uint64_t bytes() const noexcept {
    return sizeof(PreparedDelta) + 4 * (rows.size() + l.size() + r.size()) +
           sizeof(ColumnRun) * col_runs.size();
  }
};

// A low-rank client: deltas held (add_low_rank with deltas) or made per tensor (with a source).
struct LowRankClient {
  std::string label;
  float weight;
  std::vector<PreparedDelta> held;
  std::vector<std::pair<std::size_t, std::string>> lazy;  // (layout index, name), made by `make`
  LowRankSource make;
};

// The entries [i, e) of d.rows inside target rows [a, b); with d.rows empty (every row
// covered) the range [a, b) itself, as row numbers.
std::pair<std::size_t, std::size_t> covered_range(const PreparedDelta& d, std::uint64_t a,
                                                  std::uint64_t b) {
  if (d.rows.empty()) return {static_cast<std::size_t>(a), static_cast<std::size_t>(b)};
  const auto lo = std::lower_bound(d.rows.begin(), d.rows.end(), a) - d.rows.begin();
  const auto hi = std::lower_bound(d.rows.begin() + lo, d.rows.end(), b) - d.rows.begin();
  return {static_cast<std::size_t>(lo), static_cast<std::size_t>(hi)};
}
bool covers_rows(const PreparedDelta& d, std::uint64_t a, std::uint64_t b) {
  const auto [i, e] = covered_range(d, a, b);
  return i != e;
}

// Checks a delta against target tensor `ti` and lays it out; throws Error naming `label`.
PreparedDelta prepare_delta(LowRankDelta d, const ModelLayout& layout, std::size_t ti,
                            const std::string& label) {
  const auto where = [&]() { return label + ": "; };
  const auto& meta = layout.tensors()[ti].meta;
  if (meta.shape.rank() != 2 || !detail::is_aggregatable(meta.dtype)) {
    fail(where(), "tensor '", d.tensor, "' is ", meta.shape.to_string(), " ",
         dtype_name(meta.dtype), "; a low-rank delta needs a 2-d float weight (client rejected)");
  }
  const std::uint64_t rows = meta.shape[0], cols = meta.shape[1];
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
  const std::uint64_t nr = d.rows.empty() ? rows : d.rows.size();
  const std::uint64_t nc = d.cols.empty() ? cols : d.cols.size();
  if (d.rank == 0 || d.l.size() != nr * d.rank || d.r.size() != d.rank * nc) {
    fail(where(), "tensor '", d.tensor, "': factors of ", d.l.size(), " and ", d.r.size(),
         " values do not make a rank-", d.rank, " update of ", nr, " of its ", rows, " rows and ",
         nc, " of its ", cols, " columns (client rejected)");
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
  PreparedDelta p;
  p.tensor = ti;
  p.rank = d.rank;
  p.scale = d.scale;
  p.rows = std::move(d.rows);
  p.l = std::move(d.l);
  // Column runs, and R re-laid out as one block per run.
  auto col = [&](std::size_t j) -> std::uint32_t {
    return d.cols.empty() ? static_cast<std::uint32_t>(j) : d.cols[j];
  };
  p.r.resize(d.r.size());
  for (std::size_t j = 0; j < nc;) {
    std::size_t e = j + 1;
    while (e < nc && col(e) == col(e - 1) + 1) ++e;
    const ColumnRun run{col(j), static_cast<std::uint32_t>(e - j), j * d.rank};
    for (std::size_t k = 0; k < d.rank; ++k) {
      std::memcpy(p.r.data() + run.r_offset + k * run.len, d.r.data() + k * nc + j,
                  run.len * sizeof(float));
    }
    p.col_runs.push_back(run);
    j = e;
  }
  return p;
}

// Upper bound of the bytes build_work and its temporaries hold for one client's share of a
// tensor whose local shape is `local`: row lists (none when its rows map to themselves), one
// scatter run and one (target, local) offset pair per inner position.
std::uint64_t contribution_bound(const Shape& local, bool identity_rows) {
  const std::uint64_t rows = local.rank() >= 2 ? local[0] : 1;
  const std::uint64_t inner = rows ? local.numel() / rows : 0;
  return 128 + (identity_rows ? 0 : 8 * rows) + (sizeof(ScatterRun) + 16) * inner;
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

// An element of a tensor of `dtype` (F32, BF16 or F16) at p[e] (bytes): whether it is finite,
// its value, and storing a double rounded to it when the result is finite there.
bool stored_fits(DType dtype, const std::byte* p, std::size_t e) {
  if (dtype == DType::kF32) return std::isfinite(reinterpret_cast<const float*>(p)[e]);
  const std::uint16_t bits = reinterpret_cast<const std::uint16_t*>(p)[e];
  return dtype == DType::kBF16 ? (bits & 0x7F80u) != 0x7F80u : (bits & 0x7C00u) != 0x7C00u;
}

double stored_as_double(DType dtype, const std::byte* p, std::size_t e) {
  if (dtype == DType::kF32) return reinterpret_cast<const float*>(p)[e];
  if (dtype == DType::kBF16) return to_f32(reinterpret_cast<const BFloat16*>(p)[e]);
  return to_f32(reinterpret_cast<const Float16*>(p)[e]);
}

bool store_if_fits(DType dtype, std::byte* p, std::size_t e, double value) {
  const float f = static_cast<float>(value);
  if (!std::isfinite(f)) return false;
  if (dtype == DType::kF32) {
    reinterpret_cast<float*>(p)[e] = f;
    return true;
  }
  if (dtype == DType::kBF16) {
    const BFloat16 h = to_bf16(f);
    if ((h.bits & 0x7F80u) == 0x7F80u) return false;
    reinterpret_cast<BFloat16*>(p)[e] = h;
    return true;
  }
  const Float16 h = to_f16(f);
  if ((h.bits & 0x7C00u) == 0x7C00u) return false;
  reinterpret_cast<Float16*>(p)[e] = h;
  return true;
}

// "[i, j]": the index of flat element `flat` of `shape`.
std::string element_text(const Shape& shape, std::uint64_t flat) {
  std::vector<std::uint64_t> idx(static_cast<std::size_t>(shape.rank()), 0);
  for (std::size_t d = idx.size(); d-- > 0;) {
    const std::uint64_t n = shape[static_cast<int>(d)];
    idx[d] = n ? flat % n : 0;
    flat = n ? flat / n : 0;
  }
  std::string out = "[";
  for (std::size_t d = 0; d < idx.size(); ++d) out += (d ? ", " : "") + std::to_string(idx[d]);
  return out + "]";
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
  std::vector<std::pair<std::uint64_t, std::uint64_t>> segs;  // covered [begin, end) within a row
};

// A tile whose contributions cover at most this many column segments, together at most half
// a row, is zeroed and finalised only there and copied elsewhere.
constexpr std::size_t kMaxSegments = 16;

}  // namespace

struct Aggregator::Impl {
  ModelLayout layout;
  AggregateOptions opt;
  std::vector<Client> clients;
  std::vector<LowRankClient> low_rank;
  std::vector<TensorCoverage> report;
  std::vector<char> report_started;  // by tensor: min_contributors holds a real value
  std::vector<std::string> rejected;  // kWhileFusing: clients dropped for non-finite values
  // Set when a tile finalised a NaN or Inf sum (kWhileFusing: a pending client may hold one).
  std::atomic<bool> saw_nonfinite{false};
  // Contributions of the tensor last computed, in client order. A client's share is the same
  // for every tensor of a {layer} rule (the plan's lists do not depend on the layer), so
  // those are built once per rule and client and kept in rule_work until finalize ends or a
  // client is added; the others are built per tensor into own_work and freed on the next.
  std::size_t work_tensor = kNpos;
  std::vector<const Contribution*> work;
  std::vector<Contribution> own_work;
  struct RuleWork {
    bool started = false;
    Shape shape;                       // of the tensor it was built for
    std::vector<Contribution> of;      // by client index
    std::vector<char> state;           // by client index: 0 not built, 1 kept, 2 holds nothing
  };
  std::vector<RuleWork> rule_work;  // by schema rule

  Impl(ModelLayout l, AggregateOptions o)
      : layout(std::move(l)),
        opt(o),
        tensor_bytes(layout.tensors().size(), 0),
        rule_bytes(layout.schema().rules().size(), 0),
        layer_rule(layout.schema().rules().size(), 0) {
    for (const auto& t : layout.tensors()) {
      if (t.layer >= 0) layer_rule[t.rule] = 1;
    }
  }

  void build_work(std::size_t ti);
  // Rows [r0, r1) of tensor ti from the target's rows at base_rows; coverage counted for
  // rows >= stats_from_row.
  void compute(std::size_t ti, const std::byte* base_rows, std::uint64_t r0, std::uint64_t r1,
               std::byte* out, std::uint64_t stats_from_row);
  void ensure_report();
  void check_ready() const;
  // Scans the pending clients (kWhileFusing), drops those holding a NaN or Inf value (their
  // messages into `rejected`) and marks the rest checked; returns how many it dropped.
  std::size_t check_pending();
  bool any_pending() const noexcept {
    for (const auto& c : clients) {
      if (c.pending) return true;
    }
    return false;
  }
  // The low-rank deltas of tensor ti with their clients' weights, in client order (built
  // once per tensor, with the deltas of source clients made then and freed on the next).
  struct LowRankWork {
    const PreparedDelta* delta;
    float weight;
  };
  std::size_t lr_tensor = kNpos;
  std::vector<PreparedDelta> lr_made;
  std::vector<LowRankWork> lr_work;
  const std::vector<LowRankWork>& low_rank_work(std::size_t ti);
  // Adds the deltas covering rows [a, b) to a tile.
  // Weights are multiplied by wmul (1, or the power of two of overflow_scale()).
  static void add_low_rank_tile(const std::vector<LowRankWork>& work, std::uint64_t a,
                                std::uint64_t b, std::size_t row_len, float* acc, float* wsum,
                                std::uint32_t* count, float wmul);
  // A power of two 2^-k with the sum of every client's weight times it at most 1: the weights
  // of a tile computed again after an overflow. Scaled so, a weighted sum of finite values
  // stays within the range of its largest value, and the mean is unchanged.
  float overflow_scale() const;
  void forget_shares() {
    work.clear();
    work.shrink_to_fit();
    own_work.clear();
    own_work.shrink_to_fit();
    rule_work.clear();
    rule_work.shrink_to_fit();
    work_tensor = kNpos;
  }
  void forget_work() {
    forget_shares();
    lr_made.clear();
    lr_made.shrink_to_fit();
    lr_work.clear();
    lr_tensor = kNpos;
  }
  // resident_bytes(): what clients hold until finalize, per tensor what computing it holds,
  // and per {layer} rule what its kept shares hold.
  std::uint64_t held_bytes = 0;
  std::vector<std::uint64_t> tensor_bytes;
  std::vector<std::uint64_t> rule_bytes;
  std::vector<char> layer_rule;  // by schema rule: it names a tensor of some layer
  std::uint64_t build_peak = 0;
  // Plan, index lists and per-tensor tables of a sub-model client, and its share of each tensor.
  void count_client(const Client& c, const std::vector<ClientTensor>& tensors);
  // The mode and weight rules every low-rank client meets.
  void check_low_rank_client(float weight, const std::string& label) const;
  // Looks up a low-rank delta's tensor for client `label`.
  std::size_t low_rank_tensor(const std::string& name, const std::string& label) const;
};

void Aggregator::Impl::count_client(const Client& c,
                                    const std::vector<ClientTensor>& tensors) {
  std::uint64_t b = sizeof(Client) + c.label.size() + c.local.size() * sizeof(ConstTensorView) +
                    c.held.size() + sizeof(detail::PlanLists);
  for (const auto& [axis, list] : c.plan.axes) b += 64 + axis.size() + 4 * list.size();
  for (const auto& [axis, list] : c.plan.aggregate_only) b += 64 + axis.size() + 4 * list.size();
  for (const auto& list : c.lists->axis) b += 24 + 4 * list.size();
  for (const auto& mask : c.lists->aggregate_mask) b += 24 + mask.size() / 8;
  b += 8 * c.lists->local_layer.size();
  held_bytes += b;
  // Axes the client holds whole and in order, unmasked: tensors whose rows run along one of
  // them keep no row lists (build_work's identity contributions).
  std::vector<char> whole(c.lists->axis.size(), 0);
  for (std::size_t a = 0; a < whole.size(); ++a) {
    const auto& list = c.lists->axis[a];
    bool in_order = list.size() == layout.axes()[a].size && c.lists->aggregate_mask[a].empty();
    for (std::size_t i = 0; i < list.size() && in_order; ++i) in_order = list[i] == i;
    whole[a] = in_order ? 1 : 0;
  }
  std::vector<std::uint64_t> per_rule(rule_bytes.size(), 0);
  for (const auto& ct : tensors) {
    if (!c.held[ct.target_index]) continue;
    const auto& t = layout.tensors()[ct.target_index];
    bool identity_rows = t.meta.shape.rank() < 2;
    if (!identity_rows) {
      const DimBinding& d0 = layout.rule_of(t).dims[0];
      identity_rows = d0.axis == DimBinding::kNoAxis || whole[static_cast<std::size_t>(d0.axis)];
    }
    const std::uint64_t share = contribution_bound(ct.shape, identity_rows);
    // Built per tensor, or (a {layer} rule) kept for the rule: counted both ways.
    tensor_bytes[ct.target_index] += share;
    if (t.layer >= 0) per_rule[t.rule] = std::max(per_rule[t.rule], share);
    // While one contribution is built its row pairs and lists exist even when freed after.
    const std::uint64_t rows = ct.shape.rank() >= 2 ? ct.shape[0] : 1;
    build_peak = std::max(build_peak, 24 * rows);
  }
  for (std::size_t r = 0; r < per_rule.size(); ++r) rule_bytes[r] += per_rule[r];
}

std::size_t Aggregator::Impl::low_rank_tensor(const std::string& name,
                                              const std::string& label) const {
  const ModelLayout::Tensor* found = layout.find(name);
  if (found == nullptr) fail(label, ": tensor '", name, "' is not in the target (client rejected)");
  return static_cast<std::size_t>(found - layout.tensors().data());
}

const std::vector<Aggregator::Impl::LowRankWork>& Aggregator::Impl::low_rank_work(std::size_t ti) {
  if (lr_tensor == ti) return lr_work;
  lr_work.clear();
  lr_made.clear();
  lr_tensor = kNpos;
  std::size_t lazy = 0;
  for (const auto& c : low_rank) {
    if (c.weight == 0.0f) continue;
    for (const auto& entry : c.lazy) lazy += entry.first == ti ? 1 : 0;
  }
  lr_made.reserve(lazy);  // the work points into it
  for (const auto& c : low_rank) {
    if (c.weight == 0.0f) continue;
    for (const auto& d : c.held) {
      if (d.tensor == ti) lr_work.push_back({&d, c.weight});
    }
    for (const auto& [t, name] : c.lazy) {
      if (t != ti) continue;
      LowRankDelta d = c.make(name);
      if (d.tensor != name) {
        fail(c.label, ": asked for tensor '", name, "' the source made '", d.tensor, "'");
      }
      lr_made.push_back(prepare_delta(std::move(d), layout, ti, c.label));
      lr_work.push_back({&lr_made.back(), c.weight});
    }
  }
  lr_tensor = ti;
  return lr_work;
}

float Aggregator::Impl::overflow_scale() const {
  double total = 0.0;
  for (const auto& c : clients) total += c.weight;
  for (const auto& c : low_rank) total += c.weight;
  int k = 0;
  while (total > 1.0 && k < 126) {
    total /= 2.0;
    ++k;
  }
  return std::ldexp(1.0f, -k);
}

void Aggregator::Impl::add_low_rank_tile(const std::vector<LowRankWork>& work, std::uint64_t a,
                                         std::uint64_t b, std::size_t row_len, float* acc,
                                         float* wsum, std::uint32_t* count, float wmul) {
  for (const LowRankWork& lw : work) {
    const LowRankWork w{lw.delta, lw.weight * wmul};
    const PreparedDelta& d = *w.delta;
    const auto [i, e] = covered_range(d, a, b);
    if (i == e) continue;
    const float scale = w.weight * d.scale;
    // One lora_update per run of consecutive rows [r0, r1) (whose L rows start at l0) and
    // run of consecutive columns.
    auto run = [&](std::uint64_t r0, std::uint64_t r1, const float* l0) {
      const std::size_t nrows = static_cast<std::size_t>(r1 - r0);
      for (const ColumnRun& cr : d.col_runs) {
        lora_update(acc + (r0 - a) * row_len + cr.c0, row_len, l0, d.r.data() + cr.r_offset,
                    nrows, cr.len, d.rank, scale);
      }
      for (std::uint64_t r = r0; r < r1; ++r) {
        float* wr = wsum + (r - a) * row_len;
        std::uint32_t* cnt = count ? count + (r - a) * row_len : nullptr;
        for (const ColumnRun& cr : d.col_runs) {
          for (std::size_t j = cr.c0; j < cr.c0 + cr.len; ++j) wr[j] += w.weight;
          if (cnt) for (std::size_t j = cr.c0; j < cr.c0 + cr.len; ++j) ++cnt[j];
        }
      }
    };
    if (d.rows.empty()) {
      run(a, b, d.l.data() + a * d.rank);
      continue;
    }
    for (std::size_t k = i; k < e;) {
      std::size_t m = k + 1;
      while (m < e && d.rows[m] == d.rows[m - 1] + 1) ++m;
      run(d.rows[k], std::uint64_t{d.rows[m - 1]} + 1, d.l.data() + k * d.rank);
      k = m;
    }
  }
}

void Aggregator::Impl::check_ready() const {
  const std::string after =
      rejected.empty() ? std::string()
                       : detail::concat(" (after dropping ", rejected.size(),
                                        " client(s) for non-finite values; the first: ", rejected[0], ")");
  if (clients.empty() && low_rank.empty()) fail("aggregate: no client update was added", after);
  double total = 0;
  for (const auto& c : clients) total += c.weight;
  for (const auto& c : low_rank) total += c.weight;
  if (!(total > 0)) fail("aggregate: the client weights are all zero", after);
}

std::size_t Aggregator::Impl::check_pending() {
  std::vector<std::size_t> of;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (clients[k].pending) of.push_back(k);
  }
  // Each client's tensors in plan order, as add() scans them.
  std::vector<std::vector<ClientTensor>> tensors(of.size());
  std::vector<ScanJob> jobs(of.size());
  for (std::size_t j = 0; j < of.size(); ++j) {
    const Client& c = clients[of[j]];
    tensors[j] = detail::client_tensors(layout, *c.lists, std::nullopt);
    jobs[j].label = &c.label;
    for (const auto& ct : tensors[j]) jobs[j].tensors.push_back({ct.name, &c.local[ct.target_index]});
  }
  if (jobs.empty()) return 0;
  const std::vector<std::string> fault = nonfinite_faults(jobs);
  std::vector<char> drop(clients.size(), 0);
  std::size_t dropped = 0;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    Client& c = clients[of[j]];
    c.pending = false;
    if (fault[j].empty()) continue;
    rejected.push_back(fault[j]);
    drop[of[j]] = 1;
    ++dropped;
  }
  if (dropped == 0) return 0;
  std::vector<Client> kept;
  kept.reserve(clients.size() - dropped);
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (!drop[k]) kept.push_back(std::move(clients[k]));
  }
  clients = std::move(kept);
  forget_work();  // the shares point at clients and are indexed by client
  return dropped;
}

namespace {

// Sorts pairs by their first element unless they already are (a window that does not wrap,
// a whole axis): the common case costs one pass.
template <typename Pair>
void sort_if_needed(std::vector<Pair>& v) {
  if (!std::is_sorted(v.begin(), v.end())) std::sort(v.begin(), v.end());
}

// Client c's share of tensor t (layout index ti); false when the client holds none of it.
bool make_contribution(const ModelLayout& layout, const ModelLayout::Tensor& t, const Client& c,
                       Contribution& w) {
  const int rank = t.meta.shape.rank();
  const auto s = detail::slice_of(layout, t, *c.lists, true);
  w.client = &c;
  const RowShape local = row_shape(s.local_shape);
  w.x_rows = local.rows;
  w.x_row_len = local.row_len;
  // Rows.
  if (rank >= 2) {
    std::vector<std::pair<std::uint32_t, std::uint32_t>> rows;
    rows.reserve(s.elems[0].size());
    for (std::size_t i = 0; i < s.elems[0].size(); ++i) {
      if (s.keep[0][i]) rows.push_back({s.elems[0][i], static_cast<std::uint32_t>(i)});
    }
    sort_if_needed(rows);
    w.trow.resize(rows.size());
    w.lrow.resize(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      w.trow[i] = rows[i].first;
      w.lrow[i] = rows[i].second;
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
    std::uint64_t count = 1;
    for (int d = first; d < rank; ++d) {
      empty = empty || s.elems[d].empty();
      count *= s.elems[d].size();
    }
    if (!empty) inner.reserve(count);
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
  sort_if_needed(inner);
  for (std::size_t i = 0; i < inner.size();) {
    std::size_t j = i + 1;
    while (j < inner.size() && inner[j].first == inner[j - 1].first + 1 &&
           inner[j].second == inner[j - 1].second + 1) {
      ++j;
    }
    w.runs.push_back({inner[i].first, inner[i].second, j - i});
    i = j;
  }
  if (w.trow.empty() || w.runs.empty()) return false;  // masked out entirely
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
  return true;
}

}  // namespace

void Aggregator::Impl::build_work(std::size_t ti) {
  if (work_tensor == ti) return;
  work.clear();
  own_work.clear();
  work_tensor = kNpos;
  const auto& t = layout.tensors()[ti];
  std::vector<std::size_t> holders;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (clients[k].held[ti] && clients[k].weight != 0.0f) holders.push_back(k);
  }
  RuleWork* rw = nullptr;
  if (t.layer >= 0) {
    if (rule_work.size() != layout.schema().rules().size()) {
      rule_work.clear();
      rule_work.resize(layout.schema().rules().size());
    }
    rw = &rule_work[t.rule];
    if (!rw->started) {
      rw->started = true;
      rw->shape = t.meta.shape;
      rw->of.resize(clients.size());
      rw->state.assign(clients.size(), 0);
    } else if (rw->shape != t.meta.shape) {
      rw = nullptr;  // a rule whose unbound dimensions differ by layer: built per tensor
    }
  }
  // Each client's share on its own, in parallel; kept in client order.
  if (rw != nullptr) {
    std::vector<std::size_t> missing;
    for (const std::size_t k : holders) {
      if (rw->state[k] == 0) missing.push_back(k);
    }
    parallel_for(missing.size(), 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        const std::size_t k = missing[i];
        rw->state[k] = make_contribution(layout, t, clients[k], rw->of[k]) ? 1 : 2;
      }
    });
    for (const std::size_t k : holders) {
      if (rw->state[k] == 1) work.push_back(&rw->of[k]);
    }
  } else {
    own_work.resize(holders.size());
    std::vector<char> kept(holders.size(), 0);
    parallel_for(holders.size(), 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        kept[i] = make_contribution(layout, t, clients[holders[i]], own_work[i]) ? 1 : 0;
      }
    });
    for (std::size_t i = 0; i < holders.size(); ++i) {
      if (kept[i]) work.push_back(&own_work[i]);
    }
  }
  work_tensor = ti;
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
  const std::vector<LowRankWork>& lr_work = low_rank_work(ti);
  const std::size_t grain = std::max<std::size_t>(1, num_tiles / (8 * num_threads()));
  parallel_for(num_tiles, grain, [&](std::size_t tb, std::size_t te) {
    thread_local Scratch sc;
    for (std::size_t tile = tb; tile < te; ++tile) {
      const std::uint64_t a = r0 + tile * tile_rows, b = std::min(r1, a + tile_rows);
      const std::size_t rows = static_cast<std::size_t>(b - a);
      const std::size_t n = rows * static_cast<std::size_t>(rs.row_len);
      sc.ranges.resize(work.size());
      bool any = false;
      for (std::size_t k = 0; k < work.size(); ++k) {
        const Contribution& w = *work[k];
        std::size_t lo, hi;
        if (w.identity) {
          lo = static_cast<std::size_t>(std::min<std::uint64_t>(a, w.identity_rows));
          hi = static_cast<std::size_t>(std::min<std::uint64_t>(b, w.identity_rows));
        } else if (tile == tb) {
          lo = static_cast<std::size_t>(std::lower_bound(w.trow.begin(), w.trow.end(), a) - w.trow.begin());
          hi = static_cast<std::size_t>(std::lower_bound(w.trow.begin() + lo, w.trow.end(), b) - w.trow.begin());
        } else {  // the chunk's tiles follow each other: go on from the previous tile's end
          lo = hi = sc.ranges[k].second;
          while (hi < w.trow.size() && w.trow[hi] < b) ++hi;
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
      const std::size_t row_len = static_cast<std::size_t>(rs.row_len);
      // The positions within a row that the contributions present here cover: when they are
      // a few segments and at most half the row (width-sliced clients, each holding 1/8 of a
      // row), only they are zeroed and finalised, and the rest of the row is copied. Elements
      // outside them have no contributor, so finalize would keep their bits anyway: the
      // result is the same bit for bit.
      std::size_t nseg = 0;  // 0: the whole row
      if (!low_rank_here) {
        auto& segs = sc.segs;
        segs.clear();
        bool few = true;
        for (std::size_t k = 0; k < work.size() && few; ++k) {
          if (sc.ranges[k].first == sc.ranges[k].second) continue;
          for (const ScatterRun& run : work[k]->runs) {
            segs.push_back({run.dst, run.dst + run.len});
            if (segs.size() > 4 * kMaxSegments) {
              few = false;
              break;
            }
          }
        }
        if (few) {
          std::sort(segs.begin(), segs.end());
          std::size_t m = 0;
          std::uint64_t total = 0;
          for (const auto& sg : segs) {
            if (m > 0 && sg.first <= segs[m - 1].second) {
              segs[m - 1].second = std::max(segs[m - 1].second, sg.second);
            } else {
              segs[m++] = sg;
            }
          }
          segs.resize(m);
          for (const auto& sg : segs) total += sg.second - sg.first;
          if (m <= kMaxSegments && 2 * total <= row_len) nseg = m;
        }
      }
      // Sub-model clients first, then the low-rank ones: a fixed order for every element.
      // -0 is the identity of +: a lone -0 contribution stays -0. Weights are multiplied by
      // wmul (1; a power of two when a tile is computed again after an overflow).
      if (sc.acc.size() < n) sc.acc.resize(n);
      if (sc.wsum.size() < n) sc.wsum.resize(n);
      if (counts && sc.count.size() < n) sc.count.resize(n);
      // Calls fn(offset, length) on the elements this tile sums and finalises: the whole
      // tile, or the segments of each row.
      auto each_part = [&](auto&& fn) {
        if (nseg == 0) {
          fn(std::size_t{0}, n);
          return;
        }
        for (std::size_t r = 0; r < rows; ++r) {
          for (const auto& [c0, c1] : sc.segs) {
            fn(r * row_len + static_cast<std::size_t>(c0), static_cast<std::size_t>(c1 - c0));
          }
        }
      };
      auto accumulate = [&](float wmul, std::uint32_t* count) {
        each_part([&](std::size_t off, std::size_t len) {
          detail::fill_f32(sc.acc.data() + off, len, -0.0f);
          std::memset(sc.wsum.data() + off, 0, len * sizeof(float));  // +0.0f
          if (count) std::memset(count + off, 0, len * sizeof(std::uint32_t));
        });
        // Sources in client order; an add_rows client's rows are made into scratch, so the
        // sources before it are added first (per element the order of additions is the same).
        auto flush = [&] {
          if (sc.sources.empty()) return;
          detail::scatter_tile(sc.acc.data(), sc.wsum.data(), count, rows,
                               static_cast<std::size_t>(rs.row_len), sc.sources.data(),
                               sc.sources.size());
          sc.sources.clear();
        };
        sc.sources.clear();
        if (sc.dst_rows.size() < work.size()) sc.dst_rows.resize(work.size());
        if (sc.src_rows.size() < work.size()) sc.src_rows.resize(work.size());
        for (std::size_t k = 0; k < work.size(); ++k) {
          const auto [lo, hi] = sc.ranges[k];
          if (lo == hi) continue;
          const Contribution& w = *work[k];
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
          const float weight = w.client->weight * wmul;
          if (w.client->rows) {
            flush();
            sc.made.resize((hi - lo) * static_cast<std::size_t>(w.x_row_len));
            sc.made_rows.resize(hi - lo);
            for (std::size_t r = 0; r < hi - lo; ++r) sc.made_rows[r] = static_cast<std::uint32_t>(r);
            w.client->rows(ti, lrow, hi - lo, static_cast<std::size_t>(w.x_row_len),
                           sc.made.data());
            sc.sources.push_back({sc.made.data(), DType::kF32, hi - lo, w.x_row_len, dst.data(),
                                  sc.made_rows.data(), dst.size(), w.runs.data(), w.runs.size(),
                                  weight});
            flush();
            continue;
          }
          const ConstTensorView& x = w.client->local[ti];
          sc.sources.push_back({x.bytes(), x.dtype(), w.x_rows, w.x_row_len, dst.data(),
                                lrow, dst.size(), w.runs.data(), w.runs.size(), weight});
        }
        flush();
        if (low_rank_here) {
          add_low_rank_tile(lr_work, a, b, static_cast<std::size_t>(rs.row_len), sc.acc.data(),
                            sc.wsum.data(), count, wmul);
        }
      };
      accumulate(1.0f, counts ? sc.count.data() : nullptr);
      bool flagged = false;  // a result of this tile is NaN, Inf or out of the output's range
      // Elements [off, off + len) of the tile; returns how many are covered. A NaN or Inf
      // sum is flagged (kWhileFusing: a pending client may hold such a value).
      auto fin = [&](std::size_t off, std::size_t len) -> std::uint64_t {
        FinalizeTally tally;
        switch (t.meta.dtype) {
          case DType::kF32:
            tally = detail::finalize_tally(
                reinterpret_cast<float*>(ot) + off, reinterpret_cast<const float*>(bt) + off,
                sc.acc.data() + off, sc.wsum.data() + off, len, mode, opt.server_lr);
            break;
          case DType::kBF16:
            tally = detail::finalize_tally(
                reinterpret_cast<BFloat16*>(ot) + off, reinterpret_cast<const BFloat16*>(bt) + off,
                sc.acc.data() + off, sc.wsum.data() + off, len, mode, opt.server_lr);
            break;
          default:
            tally = detail::finalize_tally(
                reinterpret_cast<Float16*>(ot) + off, reinterpret_cast<const Float16*>(bt) + off,
                sc.acc.data() + off, sc.wsum.data() + off, len, mode, opt.server_lr);
            break;
        }
        flagged = flagged || tally.nonfinite;
        return tally.covered;
      };
      // Without counts, the covered elements are finalize's tally: of the rows from `from` on
      // (segments; with the report's max of 0 or 1 contributors) or of the whole tile.
      const std::size_t stats_row = from < b ? static_cast<std::size_t>(from - a) : rows;
      std::uint64_t tallied = 0;
      std::uint32_t tallied_max = 0;
      if (nseg == 0) {
        tallied = fin(0, n);  // the whole tile: the report's count when it starts at row 0
      } else {
        // The tile is copied whole, in one stream, then the segments finalised over it
        // (they are at most half of it, and still in cache).
        if (ot != bt) std::memcpy(ot, bt, n * esize);
        for (std::size_t r = 0; r < rows; ++r) {
          for (const auto& [c0, c1] : sc.segs) {
            const std::uint64_t c =
                fin(r * row_len + static_cast<std::size_t>(c0), static_cast<std::size_t>(c1 - c0));
            if (r >= stats_row) {
              tallied += c;
              tallied_max = std::max<std::uint32_t>(tallied_max, c != 0 ? 1u : 0u);
            }
          }
        }
      }
      // Coverage of the rows not counted yet (outside the segments: no contributor).
      if (from < b && nseg != 0) {
        st.any = true;
        st.min = 0;  // the segments cover at most half of each row
        if (counts) {
          for (std::size_t r = stats_row; r < rows; ++r) {
            for (const auto& [c0, c1] : sc.segs) {
              const std::size_t off = r * row_len + static_cast<std::size_t>(c0),
                                len = static_cast<std::size_t>(c1 - c0);
              const CoverageStats cs = coverage_stats(sc.count.data() + off, len);
              st.covered += cs.covered;
              st.max = std::max(st.max, cs.max);
            }
          }
        } else {
          st.covered = tallied;
          st.max = tallied_max;
        }
      } else if (from < b) {
        const std::size_t i0 = static_cast<std::size_t>((from - a) * rs.row_len);
        st.any = true;
        if (counts) {
          const CoverageStats cs = coverage_stats(sc.count.data() + i0, n - i0);
          st.covered = cs.covered;
          st.min = cs.min;
          st.max = cs.max;
        } else {
          st.covered = i0 == 0 ? tallied : count_positive(sc.wsum.data() + i0, n - i0);
          st.min = st.covered == n - i0 ? 1u : 0u;
          st.max = st.covered != 0 ? 1u : 0u;
        }
      }
      // A result that is NaN, Inf or outside the output's range: the tile is summed again with
      // its weights scaled by a power of two (a weighted sum of finite values then stays
      // within the range of its largest value; the mean is the same), and each such element
      // is computed again in double from those sums. One that still does not fit is an error
      // naming it, unless a client not checked yet (kWhileFusing) may hold a NaN or Inf
      // value: the round is then computed again without that client.
      if (flagged) {
        accumulate(overflow_scale(), nullptr);
        const bool delta = opt.mode == AggregateMode::kDelta;
        each_part([&](std::size_t off, std::size_t len) {
          for (std::size_t e = off; e < off + len; ++e) {
            if (!(sc.wsum[e] > 0.0f) || stored_fits(t.meta.dtype, ot, e)) continue;
            const double base = stored_as_double(t.meta.dtype, bt, e);
            const double mean = static_cast<double>(sc.acc[e]) / static_cast<double>(sc.wsum[e]);
            const double inc = delta ? static_cast<double>(opt.server_lr) * mean : 0.0;
            const double r = !delta ? mean : inc == 0.0 ? base : base + inc;
            if (store_if_fits(t.meta.dtype, ot, e, r)) continue;
            if (any_pending()) {
              saw_nonfinite.store(true, std::memory_order_relaxed);
              continue;
            }
            const std::string where = detail::concat(
                "aggregate: tensor '", t.meta.name, "' element ",
                element_text(t.meta.shape, a * row_len + e), ": ");
            if (!std::isfinite(mean)) {
              fail(where, "the weighted sum of its clients' values is not finite in F32 even with "
                          "the weights scaled down (a client's value, or a LoRA product B.A, "
                          "overflows F32)");
            }
            fail(where, "the fused value ", r, " is not representable in ", dtype_name(t.meta.dtype),
                 delta ? detail::concat(" (the target's ", base, " + server_lr ", opt.server_lr,
                                        " x the weighted mean delta ", mean, ")")
                       : std::string(" (the weighted mean of its clients' values)"));
          }
        });
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

void Aggregator::Impl::check_low_rank_client(float weight, const std::string& label) const {
  if (opt.mode != AggregateMode::kDelta) {
    fail(label, ": low-rank (LoRA) updates are deltas; the aggregation mode must be delta");
  }
  if (!(weight >= 0.0f) || !(weight - weight == 0.0f)) {
    fail(label, ": weight ", weight, " must be finite and >= 0 (client rejected)");
  }
}

void Aggregator::add_low_rank(std::vector<LowRankDelta> deltas, float weight, std::string label) {
  impl_->check_low_rank_client(weight, label);
  LowRankClient c{label, weight, {}, {}, {}};
  std::uint64_t bytes = sizeof(LowRankClient) + label.size();
  for (auto& d : deltas) {
    const std::size_t ti = impl_->low_rank_tensor(d.tensor, label);
    for (const auto& other : c.held) {
      if (other.tensor == ti) fail(label, ": tensor '", d.tensor, "' given twice (client rejected)");
    }
    c.held.push_back(prepare_delta(std::move(d), impl_->layout, ti, label));
    bytes += c.held.back().bytes();
  }
  impl_->low_rank.push_back(std::move(c));
  impl_->held_bytes += bytes;
  impl_->lr_tensor = kNpos;
}

void Aggregator::add_low_rank(std::vector<std::string> tensors, float weight, std::string label,
                              LowRankSource make) {
  impl_->check_low_rank_client(weight, label);
  if (!make) fail(label, ": no low-rank source given");
  LowRankClient c{label, weight, {}, {}, std::move(make)};
  std::vector<std::uint64_t> bytes;
  for (auto& name : tensors) {
    const std::size_t ti = impl_->low_rank_tensor(name, label);
    for (const auto& other : c.lazy) {
      if (other.first == ti) fail(label, ": tensor '", name, "' given twice (client rejected)");
    }
    LowRankDelta d = c.make(name);
    if (d.tensor != name) fail(label, ": asked for tensor '", name, "' the source made '", d.tensor, "'");
    bytes.push_back(prepare_delta(std::move(d), impl_->layout, ti, label).bytes());
    c.lazy.emplace_back(ti, std::move(name));
  }
  for (std::size_t k = 0; k < c.lazy.size(); ++k) impl_->tensor_bytes[c.lazy[k].first] += bytes[k];
  impl_->held_bytes += sizeof(LowRankClient) + c.label.size() + c.lazy.size() * 48;
  impl_->low_rank.push_back(std::move(c));
  impl_->lr_tensor = kNpos;
}

std::uint64_t Aggregator::resident_bytes() const noexcept {
  std::uint64_t most = 0, kept = 0;
  for (const std::uint64_t b : impl_->tensor_bytes) most = std::max(most, b);
  // The shares kept per {layer} rule, each with a slot per sub-model client.
  for (std::size_t r = 0; r < impl_->rule_bytes.size(); ++r) {
    if (impl_->layer_rule[r]) {
      kept += impl_->rule_bytes[r] + (sizeof(Contribution) + 2) * impl_->clients.size();
    }
  }
  // Shares of a tensor are built on every thread at once.
  return impl_->held_bytes + most + kept +
         impl_->build_peak * std::max<std::size_t>(1, num_threads());
}

void Aggregator::add_rows(Plan plan, float weight, std::string label, LocalRowSource rows) {
  const ModelLayout& layout = impl_->layout;
  if (!(weight - weight == 0.0f) || weight < 0.0f) {
    fail(label, ": client weight ", weight, " is negative or not finite");
  }
  if (!rows) fail(label, ": no row source given");
  validate_plan(plan, layout, label + ": plan");
  Client c{label, weight, plan, std::make_shared<const detail::PlanLists>(layout, plan), {}, {}, std::move(rows), false};
  c.local.resize(layout.tensors().size());
  c.held.assign(layout.tensors().size(), 0);
  const auto tensors = detail::client_tensors(layout, *c.lists, std::nullopt);
  for (const auto& ct : tensors) {
    if (detail::is_aggregatable(layout.tensors()[ct.target_index].meta.dtype)) {
      c.held[ct.target_index] = 1;
    }
  }
  impl_->count_client(c, tensors);
  impl_->clients.push_back(std::move(c));
  impl_->forget_shares();  // they point at clients, which may have moved
}

void Aggregator::Impl::ensure_report() {
  if (report.size() == layout.tensors().size()) return;
  report = fresh_report(layout);
  report_started.assign(layout.tensors().size(), 0);
}

void Aggregator::compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                              std::uint64_t r1, std::byte* out) {
  impl_->check_pending();  // rows given out cannot be computed again
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
const std::vector<std::string>& Aggregator::rejected() const noexcept { return impl_->rejected; }

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
  Client c{label, weight, plan, std::make_shared<const detail::PlanLists>(layout, plan), {}, {}, {}, false};
  c.local.resize(layout.tensors().size());
  c.held.assign(layout.tensors().size(), 0);
  std::set<std::string> used;
  const auto tensors = detail::client_tensors(layout, *c.lists, std::nullopt);
  // Tensors are checked in plan order and the first fault is reported. The shape and dtype
  // checks run first; then the tensors before any such fault are scanned for NaN and Inf in
  // parallel pieces, and a non-finite value in an earlier tensor is reported instead.
  std::size_t fault_at = tensors.size();
  std::string fault;
  std::vector<const ConstTensorView*> views(tensors.size(), nullptr);
  for (std::size_t i = 0; i < tensors.size() && fault_at == tensors.size(); ++i) {
    const ClientTensor& ct = tensors[i];
    auto it = by_name.find(ct.name);
    if (it == by_name.end()) {
      fault = detail::concat(label, ": tensor '", ct.name, "' is missing (the plan gives it shape ",
                             ct.shape.to_string(), ")");
      fault_at = i;
      break;
    }
    const ConstTensorView& v = *it->second;
    views[i] = &v;
    const DType target_dtype = layout.tensors()[ct.target_index].meta.dtype;
    if (v.shape() != ct.shape) {
      fault = detail::concat(label, ": tensor '", ct.name, "' has shape ", v.shape().to_string(),
                             " but the plan gives ", ct.shape.to_string());
      fault_at = i;
    } else if (detail::is_aggregatable(target_dtype) ? !detail::is_aggregatable(v.dtype())
                                                     : v.dtype() != target_dtype) {
      fault = detail::concat(
          label, ": tensor '", ct.name, "' has dtype ", dtype_name(v.dtype()),
          detail::is_aggregatable(target_dtype)
              ? std::string("; updates must be F32, BF16 or F16")
              : "; expected the target's " + std::string(dtype_name(target_dtype)));
      fault_at = i;
    }
  }
  // kWhileFusing leaves the values of a sound client to finalize, which reads every one
  // of them unless its weight is 0 or "aggregate_only" masks some out.
  bool masked = false;
  for (const auto& mask : c.lists->aggregate_mask) masked = masked || !mask.empty();
  const bool defer = impl_->opt.finite_check == FiniteCheck::kWhileFusing &&
                     fault_at == tensors.size() && weight != 0.0f && !masked;
  if (!defer) {
    ScanJob job{&label, {}};
    for (std::size_t i = 0; i < fault_at; ++i) job.tensors.push_back({tensors[i].name, views[i]});
    const std::string bad = nonfinite_faults({job})[0];
    if (!bad.empty()) fail(bad);
  }
  if (fault_at != tensors.size()) fail(fault);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    c.local[tensors[i].target_index] = *views[i];
    c.held[tensors[i].target_index] = 1;
    used.insert(tensors[i].name);
  }
  for (const auto& v : update) {
    if (used.count(v.name) == 0) {
      fail(label, ": tensor '", v.name, "' is not part of this client's plan (extra tensor)");
    }
  }
  c.pending = defer;
  impl_->count_client(c, tensors);
  impl_->clients.push_back(std::move(c));
  impl_->forget_shares();  // they point at clients, which may have moved
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
  std::vector<const ConstTensorView*> bases(out.size());
  bool in_place = false;
  for (std::size_t i = 0; i < out.size(); ++i) {
    bases[i] = &detail::find_target(by_name, layout.tensors()[i]);
    const std::byte* b = bases[i]->bytes();
    const std::byte* o = out[i].bytes();
    const auto len = static_cast<std::size_t>(dtype_bytes(out[i].dtype(), out[i].numel()));
    in_place = in_place || (len > 0 && o < b + len && b < o + len);
  }
  if (in_place) {  // the target's own values are overwritten: no second pass possible
    impl_->check_pending();
    impl_->check_ready();
  }
  // With pending clients (kWhileFusing) a pass that finalised a NaN or Inf result is done
  // again without the clients that caused it; the second pass has no pending client left.
  for (;;) {
    impl_->report = fresh_report(layout);
    impl_->report_started.assign(layout.tensors().size(), 0);
    impl_->saw_nonfinite.store(false);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto rows = row_shape(bases[i]->shape()).rows;
      impl_->compute(i, bases[i]->bytes(), 0, rows, out[i].bytes(), 0);
    }
    impl_->forget_work();
    if (!impl_->saw_nonfinite.load() || !impl_->any_pending()) break;
    // Without the clients that hold a NaN or Inf, or (none does) with every client checked,
    // so that a result that still does not fit is an error naming it.
    impl_->check_pending();
    impl_->check_ready();
  }
  // Every value of the clients still pending went into a sum that was finite: checked.
  for (auto& c : impl_->clients) c.pending = false;
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
  impl_->check_pending();  // the writer's bytes cannot be computed again
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
