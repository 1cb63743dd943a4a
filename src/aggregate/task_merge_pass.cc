// The streamed full-model task merge (src/aggregate/task_merge_pass.h).
#include "src/aggregate/task_merge_pass.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/convert.h"
#include "src/aggregate/overflow.h"
#include "src/aggregate/row_shape.h"

namespace edgefuse::detail {
namespace {

// The passes walk fixed tiles, grouped in fixed segments; each (share, segment) is one item,
// and the items' f64 sums are added in segment order: the same bits for any thread count.
constexpr std::size_t kTileElements = 16384;
constexpr std::uint64_t kSegmentTiles = 64;
constexpr std::size_t kWaveItems = 64;  // items computed together, then added in order
constexpr std::uint64_t kNone = std::numeric_limits<std::uint64_t>::max();

// The radix select's levels over the 31 bits of |x|: the top 11 bits, then 10, then 10.
constexpr unsigned kShift[3] = {20, 10, 0};
constexpr unsigned kWidth[3] = {11, 10, 10};

std::uint32_t magnitude_bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b & 0x7FFFFFFFu;
}

bool kept_by_magnitude(const ShareTaskMerge& s, std::uint32_t bits, std::uint64_t i) {
  return bits > s.cut_bits || (bits == s.cut_bits && i <= s.tie_cutoff);
}

struct Walk {
  const std::vector<const Share*>* shares;
  std::size_t tensor;
  DType dtype;
  const std::byte* base;
  bool params;
  std::uint64_t rows;
  std::size_t row_len;
  std::uint64_t tile_rows, tiles, segments;
};

struct ItemSums {
  std::vector<std::uint64_t> hist;
  double l1 = 0, kept_l1 = 0;
  std::uint64_t covered = 0, equal = 0;
  std::uint64_t bad = kNone;  // the first covered element whose task value is not finite
};

// visit(j, x, first, n, sums) on share j's task values in each tile of segment `seg` it
// reaches (NaN where it does not cover; x[e] is flat element first + e).
template <typename Visit>
void visit_item(const Walk& w, std::size_t j, std::uint64_t seg, ItemSums& s, const Visit& visit) {
  thread_local GatherBuffers g;
  thread_local ShareScratch slot;
  thread_local std::vector<float> x, b;
  const Share& share = *(*w.shares)[j];
  const std::size_t esize = static_cast<std::size_t>(dtype_bytes(w.dtype, 1));
  RowSpan span;
  const std::uint64_t t0 = seg * kSegmentTiles, t1 = std::min(w.tiles, t0 + kSegmentTiles);
  for (std::uint64_t t = t0; t < t1; ++t) {
    const std::uint64_t a = t * w.tile_rows, z = std::min(w.rows, a + w.tile_rows);
    const RowSpan previous = span;
    span = share.locate(a, z, t != t0 ? &previous : nullptr);
    if (span.empty()) continue;
    const std::size_t rows = static_cast<std::size_t>(z - a), n = rows * w.row_len;
    x.resize(n);
    gather_share(share, span, w.tensor, a, rows, w.row_len, slot, g, x.data());
    if (w.params) {
      b.resize(n);
      widen_to_f32(w.base + a * w.row_len * esize, w.dtype, n, b.data());
    }
    for (std::size_t e = 0; e < n; ++e) {
      if (std::isnan(x[e])) continue;  // not covered
      ++s.covered;
      if (w.params) x[e] = x[e] - b[e];  // mergekit's f32 subtraction
      if (!std::isfinite(x[e])) {
        if (s.bad == kNone) s.bad = a * w.row_len + e;
        x[e] = std::nanf("");
      }
    }
    visit(j, x.data(), a * w.row_len, n, s);
  }
}

// Runs visit over the items of the shares marked in `active` (segment by segment), then
// done(j, seg, sums) for each item in that order.
template <typename Visit, typename Done>
void run_pass(const Walk& w, const std::vector<char>& active, std::size_t bins, const Visit& visit,
              const Done& done) {
  std::vector<std::pair<std::uint64_t, std::size_t>> items;
  for (std::uint64_t seg = 0; seg < w.segments; ++seg) {
    for (std::size_t j = 0; j < active.size(); ++j) {
      if (active[j]) items.emplace_back(seg, j);
    }
  }
  std::vector<ItemSums> sums(std::min(kWaveItems, items.size()));
  for (std::size_t first = 0; first < items.size(); first += kWaveItems) {
    const std::size_t count = std::min(kWaveItems, items.size() - first);
    parallel_for(count, 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        ItemSums& s = sums[i];
        s = ItemSums{};
        s.hist.assign(bins, 0);
        visit_item(w, items[first + i].second, items[first + i].first, s, visit);
      }
    });
    for (std::size_t i = 0; i < count; ++i) {
      done(items[first + i].second, items[first + i].first, sums[i]);
    }
  }
}

// Radix select state of one share: the kept count still to place below the bits chosen so far.
struct Select {
  std::uint32_t prefix = 0;
  std::uint64_t need = 0;
  std::uint64_t equal = 0;  // after the last level: the values equal to the cut
};

}  // namespace
}  // namespace edgefuse::detail

namespace edgefuse {

std::uint64_t task_merge_pass_bytes(std::size_t threads) noexcept {
  // Per thread: a tile of values, of the target, of coverage and of emitted rows.
  const std::uint64_t per_thread = std::uint64_t{4} * detail::kTileElements * 4;
  return threads * per_thread + detail::kWaveItems * ((std::size_t{1} << detail::kWidth[0]) * 8 +
                                                      sizeof(detail::ItemSums));
}

}  // namespace edgefuse

namespace edgefuse::detail {

void widen_to_f32(const std::byte* bytes, DType dtype, std::size_t n, float* out) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, bytes, n * sizeof(float));
      return;
    case DType::kBF16:
      convert(reinterpret_cast<const BFloat16*>(bytes), out, n);
      return;
    case DType::kF16:
      convert(reinterpret_cast<const Float16*>(bytes), out, n);
      return;
    default:
      fail("task merge: dtype ", dtype_name(dtype), " is not F32, BF16 or F16");
  }
}

TensorTaskMerge plan_task_merge(const TaskMergeAggregate& rule, bool params, std::size_t tensor,
                                const TensorMeta& meta, const std::vector<const Share*>& shares,
                                const std::vector<std::string>& labels,
                                const std::vector<std::size_t>& owners,
                                const std::byte* whole_base) {
  TensorTaskMerge m;
  m.spec = task_merge_spec(rule.method);
  m.rule = &rule;
  m.params = params;
  m.normalize = rule.options.normalize.value_or(m.spec.normalize_default);
  const std::size_t S = shares.size();
  m.shares.resize(S);
  const RowShape rs = row_shape(meta.shape);
  const std::uint64_t numel = rs.rows * rs.row_len;
  if (S == 0 || numel == 0) return m;
  if (params && whole_base == nullptr) {
    fail("aggregate: the task merge of tensor '", meta.name,
         "' in params mode needs the whole target tensor (finalize, or compute_rows of all its "
         "rows)");
  }
  const double density = rule.options.density;
  const bool magnitude = m.spec.sparsify == TaskMergeSpec::kMagnitude && density < 1.0;
  const bool random = m.spec.sparsify == TaskMergeSpec::kRandom && density < 1.0;
  const bool rescale = m.spec.mergekit && (magnitude || random) &&
                       rule.options.rescale.value_or(m.spec.sparsify == TaskMergeSpec::kRandom);
  for (std::size_t j = 0; j < S; ++j) {
    if (random) {
      m.shares[j].stream = task_mask_stream(rule.options.seed, meta.name, owners[j]);
      if (!m.spec.mergekit) m.shares[j].scale = 1.0 / density;
    }
  }
  const std::uint64_t keep = magnitude_keep_count(m.spec, density, numel);
  const bool select = magnitude && keep > 0 && keep < numel;
  if (magnitude && keep == 0) {
    for (auto& s : m.shares) s.cut_bits = 0xFFFFFFFFu;
  }
  Walk w{&shares,
         tensor,
         meta.dtype,
         whole_base,
         params,
         rs.rows,
         static_cast<std::size_t>(rs.row_len),
         0,
         0,
         0};
  w.tile_rows = std::max<std::uint64_t>(1, kTileElements / rs.row_len);
  w.tiles = (rs.rows + w.tile_rows - 1) / w.tile_rows;
  w.segments = (w.tiles + kSegmentTiles - 1) / kSegmentTiles;
  const std::vector<char> all(S, 1);
  std::vector<ItemSums> total(S);
  for (auto& t : total) t.hist.assign(std::size_t{1} << kWidth[0], 0);
  const double d = density;
  // Pass 1: coverage, the L1 sums of DARE's rescale, the top level of the radix select.
  run_pass(
      w, all, select ? std::size_t{1} << kWidth[0] : 0,
      [&](std::size_t j, const float* x, std::uint64_t first, std::size_t n, ItemSums& s) {
        const std::uint64_t stream = m.shares[j].stream;
        for (std::size_t e = 0; e < n; ++e) {
          if (std::isnan(x[e])) continue;
          if (rescale && random) {
            const double a = std::fabs(double(x[e]));
            s.l1 += a;
            if (task_uniform_draw(stream, first + e) < d) s.kept_l1 += a;
          }
          if (select) ++s.hist[magnitude_bits(x[e]) >> kShift[0]];
        }
      },
      [&](std::size_t j, std::uint64_t, ItemSums& s) {
        ItemSums& t = total[j];
        t.covered += s.covered;
        if (t.bad == kNone) t.bad = s.bad;
        t.l1 += s.l1;
        t.kept_l1 += s.kept_l1;
        for (std::size_t b = 0; b < s.hist.size(); ++b) t.hist[b] += s.hist[b];
      });
  for (std::size_t j = 0; j < S; ++j) {
    if (total[j].bad != kNone) {
      fail("aggregate: tensor '", meta.name, "' element ", element_text(meta.shape, total[j].bad),
           ": ", labels[j], "'s task value ", params ? "(its weight minus the target) " : "",
           "is not finite");
    }
    if (total[j].covered != numel) {
      fail("aggregate: the task merge '", task_merge_method_name(rule.method),
           "' needs clients that cover the whole of each tensor they send; ", labels[j], " covers ",
           total[j].covered, " of the ", numel, " elements of tensor '", meta.name, "'");
    }
    if (random && rescale) m.shares[j].scale = l1_rescale_factor(total[j].l1, total[j].kept_l1);
  }
  if (!select) return m;
  // Levels 1 and 2 of the radix select: each share's keep-th largest |x| bit pattern.
  std::vector<Select> sel(S);
  auto choose = [&](std::size_t j, unsigned level, const std::vector<std::uint64_t>& hist) {
    Select& s = sel[j];
    std::uint64_t above = 0;
    for (std::size_t b = hist.size(); b-- > 0;) {
      if (above + hist[b] >= s.need) {
        s.need -= above;
        s.prefix = (s.prefix << kWidth[level]) | static_cast<std::uint32_t>(b);
        s.equal = hist[b];
        return;
      }
      above += hist[b];
    }
  };
  for (std::size_t j = 0; j < S; ++j) {
    sel[j].need = keep;
    choose(j, 0, total[j].hist);
  }
  for (unsigned level = 1; level < 3; ++level) {
    const std::size_t bins = std::size_t{1} << kWidth[level];
    for (auto& t : total) t.hist.assign(bins, 0);
    const unsigned above_bits = kShift[level] + kWidth[level];
    run_pass(
        w, all, bins,
        [&](std::size_t j, const float* x, std::uint64_t, std::size_t n, ItemSums& s) {
          const std::uint32_t prefix = sel[j].prefix;
          for (std::size_t e = 0; e < n; ++e) {
            if (std::isnan(x[e])) continue;
            const std::uint32_t bits = magnitude_bits(x[e]);
            if ((bits >> above_bits) == prefix) ++s.hist[(bits >> kShift[level]) & (bins - 1)];
          }
        },
        [&](std::size_t j, std::uint64_t, ItemSums& s) {
          for (std::size_t b = 0; b < bins; ++b) total[j].hist[b] += s.hist[b];
        });
    for (std::size_t j = 0; j < S; ++j) choose(j, level, total[j].hist);
  }
  // The cut; where it falls inside a run of equal nonzero values, the flat element of the
  // last one kept (the lower indices first).
  std::vector<char> ties(S, 0);
  bool any_ties = false;
  for (std::size_t j = 0; j < S; ++j) {
    m.shares[j].cut_bits = sel[j].prefix;
    ties[j] = sel[j].need < sel[j].equal && sel[j].prefix != 0 ? 1 : 0;
    any_ties = any_ties || ties[j];
  }
  if (any_ties) {
    std::vector<std::uint64_t> equal(w.segments * S, 0);
    run_pass(
        w, ties, 0,
        [&](std::size_t j, const float* x, std::uint64_t, std::size_t n, ItemSums& s) {
          for (std::size_t e = 0; e < n; ++e) {
            if (!std::isnan(x[e]) && magnitude_bits(x[e]) == sel[j].prefix) ++s.equal;
          }
        },
        [&](std::size_t j, std::uint64_t seg, ItemSums& s) { equal[seg * S + j] = s.equal; });
    for (std::size_t j = 0; j < S; ++j) {
      if (!ties[j]) continue;
      std::uint64_t left = sel[j].need, seg = 0;
      while (equal[seg * S + j] < left) left -= equal[seg++ * S + j];
      ItemSums scan;
      std::uint64_t cutoff = kNone;
      visit_item(
          w, j, seg, scan,
          [&](std::size_t, const float* x, std::uint64_t first, std::size_t n, ItemSums&) {
            for (std::size_t e = 0; e < n && cutoff == kNone; ++e) {
              if (!std::isnan(x[e]) && magnitude_bits(x[e]) == sel[j].prefix && --left == 0) {
                cutoff = first + e;
              }
            }
          });
      m.shares[j].tie_cutoff = cutoff;
    }
  }
  if (rescale) {  // mergekit's L1 rescale of the pruned values (its `rescale` option)
    for (auto& t : total) t = ItemSums{};
    run_pass(
        w, all, 0,
        [&](std::size_t j, const float* x, std::uint64_t first, std::size_t n, ItemSums& s) {
          for (std::size_t e = 0; e < n; ++e) {
            if (std::isnan(x[e])) continue;
            const double a = std::fabs(double(x[e]));
            s.l1 += a;
            if (kept_by_magnitude(m.shares[j], magnitude_bits(x[e]), first + e)) s.kept_l1 += a;
          }
        },
        [&](std::size_t j, std::uint64_t, ItemSums& s) {
          total[j].l1 += s.l1;
          total[j].kept_l1 += s.kept_l1;
        });
    for (std::size_t j = 0; j < S; ++j) {
      m.shares[j].scale = l1_rescale_factor(total[j].l1, total[j].kept_l1);
    }
  }
  return m;
}

void task_merge_tile(const TensorTaskMerge& m, const GatherBuffers& g, const float* base_f32,
                     std::uint64_t first, std::size_t n, float* acc, std::uint32_t* count) {
  const std::size_t K = g.present.size();
  const double density = m.rule->options.density;
  const bool magnitude = m.spec.sparsify == TaskMergeSpec::kMagnitude && density < 1.0;
  const bool random = m.spec.sparsify == TaskMergeSpec::kRandom && density < 1.0;
  thread_local std::vector<double> x, w;
  x.resize(K);
  w.resize(K);
  for (std::size_t j = 0; j < K; ++j) w[j] = g.weights[j];
  for (std::size_t e = 0; e < n; ++e) {
    for (std::size_t j = 0; j < K; ++j) {
      const ShareTaskMerge& s = m.shares[g.present[j]];
      float v = g.values[j * n + e];
      if (m.params) v = v - base_f32[e];
      bool keep = true;
      if (magnitude) keep = kept_by_magnitude(s, magnitude_bits(v), first + e);
      if (random) keep = task_uniform_draw(s.stream, first + e) < density;
      x[j] = keep ? double(v) * s.scale : 0.0;
    }
    const float merged = static_cast<float>(combine_task_element(
        m.spec, x.data(), w.data(), K, m.rule->options.majority_sign, m.normalize));
    acc[e] = m.params ? base_f32[e] + merged : merged;
    count[e] = static_cast<std::uint32_t>(K);
  }
}

}  // namespace edgefuse::detail
