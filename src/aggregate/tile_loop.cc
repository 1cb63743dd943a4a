// Rows of one target tensor, tile by tile (src/aggregate/tile_loop.h).
#include "src/aggregate/tile_loop.h"

#include <algorithm>
#include <cstring>

#include "edgefuse/aggregate/tile_memory.h"
#include "edgefuse/core/parallel.h"
#include "src/aggregate/dp_noise.h"
#include "src/aggregate/gather.h"
#include "src/aggregate/row_shape.h"
#include "edgefuse/core/error.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "src/kernels/nonfinite.h"
#include "src/kernels/tile.h"

namespace edgefuse::detail {
namespace {

float widen_value(float x) { return x; }
float widen_value(BFloat16 x) { return to_f32(x); }
float widen_value(Float16 x) { return to_f32(x); }

// A tile whose shares cover at most this many column segments, together at most half a row,
// is cleared and finalised only there and copied elsewhere.
constexpr std::size_t kMaxSegments = 16;

// One thread's buffers, reused from tile to tile.
struct TileScratch {
  std::vector<float> acc, wsum;
  std::vector<std::uint32_t> count;
  std::vector<ScatterSource> batch;
  std::vector<float> made;
  std::vector<std::uint32_t> made_rows;
  GatherBuffers gathered;           // robust rules: each covering share's values, one slice each
  std::vector<float> base;          // task merge in params mode: the target's values in f32
  std::vector<ShareScratch> slots;  // by share
  std::vector<RowSpan> spans;       // by share: its rows in the current tile
  Segments segs;
};

// Step 2: the column segments the shares present cover, merged, when they are at most
// kMaxSegments and together at most half the row (width-sliced clients each hold 1/8 of a
// row); else 0, for the whole row. Elements outside them have no contributor, so
// finalising them would keep their bits anyway: the result is the same bit for bit.
std::size_t covered_segments(const std::vector<const Share*>& shares,
                             const std::vector<RowSpan>& spans, std::size_t row_len,
                             Segments& segs) {
  constexpr std::size_t kLimit = 4 * kMaxSegments;
  segs.clear();
  for (std::size_t k = 0; k < shares.size(); ++k) {
    if (spans[k].empty()) continue;
    shares[k]->add_segments(segs, kLimit);
    if (segs.size() > kLimit) return 0;
  }
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
  return m <= kMaxSegments && 2 * total <= row_len ? m : 0;
}

// Calls fn(offset, length) on the elements a tile sums and finalises: the whole tile (no
// segments), or the segments of each row.
template <typename Fn>
void each_part(std::size_t rows, std::size_t row_len, std::size_t nseg, const Segments& segs,
               Fn&& fn) {
  if (nseg == 0) {
    fn(std::size_t{0}, rows * row_len);
    return;
  }
  for (std::size_t r = 0; r < rows; ++r) {
    for (const auto& [c0, c1] : segs) {
      fn(r * row_len + static_cast<std::size_t>(c0), static_cast<std::size_t>(c1 - c0));
    }
  }
}

// Step 3: the sums of the tile's parts cleared, then every share's contribution in order,
// weights times wmul (1; a power of two when a tile is computed again after an overflow).
// -0 is the identity of +: a lone -0 contribution stays -0.
void accumulate(const TensorRows& job, const TileSums& sums, std::size_t nseg, TileScratch& sc,
                float wmul) {
  each_part(sums.rows, sums.row_len, nseg, sc.segs, [&](std::size_t off, std::size_t len) {
    fill_f32(sums.acc + off, len, -0.0f);
    std::memset(sums.wsum + off, 0, len * sizeof(float));  // +0.0f
    if (sums.count) std::memset(sums.count + off, 0, len * sizeof(std::uint32_t));
  });
  const auto& shares = *job.shares;
  if (sc.slots.size() < shares.size()) sc.slots.resize(shares.size());
  TileSink sink(sums, sc.batch, sc.made, sc.made_rows);
  for (std::size_t k = 0; k < shares.size(); ++k) {
    if (sc.spans[k].empty()) continue;
    shares[k]->emit(job.tensor, sc.spans[k], EmitWeight{wmul}, sc.slots[k], sink);
  }
  sink.flush();
}

// Step 3b, DP-FedAvg: the noise added to the sums of the tile's parts (counts kept).
void add_noise(const TensorRows& job, const TileSums& sums, std::size_t nseg,
               const Segments& segs) {
  const ClipOptions& clip = *job.options->clip;
  if (!(clip.noise_multiplier > 0.0)) return;
  each_part(sums.rows, sums.row_len, nseg, segs, [&](std::size_t off, std::size_t len) {
    add_dp_noise(sums.acc + off, sums.wsum + off, sums.count + off, len,
                 sums.first_row * sums.row_len + off, static_cast<std::uint32_t>(job.tensor), clip);
  });
}

// Step 3, robust rules: each share's own values gathered (gather.h), then the rule per element
// into acc, with count the number of covering shares and wsum 1 where there is one (0
// elsewhere), so that finalising acc / wsum gives the rule's value exactly.
void gather_and_reduce(const TensorRows& job, const TileSums& sums, const std::byte* base,
                       TileScratch& sc) {
  const std::size_t n = sums.rows * sums.row_len;
  GatherBuffers& g = sc.gathered;
  gather_tile(*job.shares, sc.spans, job.tensor, sums.first_row, sums.rows, sums.row_len, g);
  if (job.task_merge != nullptr) {
    if (job.task_merge->params) {
      sc.base.resize(n);
      widen_to_f32(base, job.meta->dtype, n, sc.base.data());
    }
    task_merge_tile(*job.task_merge, g, sc.base.data(), sums.first_row * sums.row_len, n, sums.acc,
                    sums.count);
  } else if (job.options->robust && job.options->robust->weighted) {
    weighted_median(g.values.data(), g.weights.data(), g.present.size(), n, n, sums.acc,
                    sums.count);
  } else if (job.options->robust) {
    const RobustAggregate& rule = *job.options->robust;
    robust_reduce(g.values.data(), g.present.size(), n, n, rule.rule, rule.beta, sums.acc,
                  sums.count);
  } else {  // Bulyan
    closest_to_median_mean(g.values.data(), g.present.size(), n, n, job.options->selection->f,
                           sums.acc, sums.count);
  }
  for (std::size_t e = 0; e < n; ++e) sums.wsum[e] = sums.count[e] != 0 ? 1.0f : 0.0f;
}

// A robust result that is not finite in the output dtype: an Error naming the first such
// element (the rule's value is exact in f32, so computing again cannot help).
template <typename T>
void fail_nonfinite_robust(const TensorRows& job, const T* out, const TileScratch& sc,
                           std::size_t n, std::uint64_t tile_start) {
  const ConstTensorView part(out, dtype_of<T>, Shape{n});
  for (std::size_t at = 0; at < n;) {
    const std::size_t bad = first_nonfinite(part, at, n);
    if (bad == kNoIndex) return;
    const std::size_t i = at + bad;
    at = i + 1;
    if (!(sc.wsum[i] > 0.0f)) continue;
    fail("aggregate: tensor '", job.meta->name, "' element ",
         element_text(job.meta->shape, tile_start + i), ": the ",
         job.task_merge != nullptr                          ? "task merge"
         : !job.options->robust                             ? "Bulyan mean"
         : job.options->robust->rule == RobustRule::kMedian ? "median"
                                                            : "trimmed mean",
         " ", sc.acc[i], " gives ", widen_value(out[i]), ", which is not finite in ",
         dtype_name(job.meta->dtype));
  }
}

// Step 4b: the server optimizer's step on elements [off, off + len) of a tile starting at flat
// element `tile_start`; how many are covered. A covered result that is not finite in the
// output dtype is an Error naming it (a round with a server optimizer cannot be computed
// again: its state has moved).
template <typename T>
std::uint64_t server_part(const TensorRows& job, T* out, const T* base, const TileScratch& sc,
                          std::size_t off, std::size_t len, std::uint64_t tile_start) {
  const std::uint64_t at = tile_start - job.server_first + off;
  float* m = job.server_m + at;
  float* v = job.server_v ? job.server_v + at : nullptr;
  const std::uint64_t covered = server_step_here(out + off, base + off, sc.acc.data() + off,
                                                 sc.wsum.data() + off, m, v, len, *job.server);
  // NaN and Inf found on the bit patterns (SIMD); an uncovered element kept its own value.
  const ConstTensorView part(out + off, dtype_of<T>, Shape{len});
  for (std::size_t at = 0; at < len;) {
    const std::size_t bad = first_nonfinite(part, at, len);
    if (bad == kNoIndex) break;
    const std::size_t i = off + at + bad;
    at += bad + 1;
    if (!(sc.wsum[i] > 0.0f)) continue;
    fail("aggregate: tensor '", job.meta->name, "' element ",
         element_text(job.meta->shape, tile_start + i), ": the server optimizer's step gives ",
         widen_value(out[i]), ", which is not finite in ", dtype_name(job.meta->dtype));
  }
  return covered;
}

// Step 4: elements [off, off + len) finalised into out; how many are covered. A result that
// is NaN, Inf or out of the output's range sets `flagged`.
std::uint64_t finalize_part(const TensorRows& job, std::byte* out, const std::byte* base,
                            const TileScratch& sc, std::size_t off, std::size_t len,
                            std::uint64_t tile_start, bool& flagged) {
  if (job.server != nullptr) {
    switch (job.meta->dtype) {
      case DType::kF32:
        return server_part(job, reinterpret_cast<float*>(out), reinterpret_cast<const float*>(base),
                           sc, off, len, tile_start);
      case DType::kBF16:
        return server_part(job, reinterpret_cast<BFloat16*>(out),
                           reinterpret_cast<const BFloat16*>(base), sc, off, len, tile_start);
      default:
        return server_part(job, reinterpret_cast<Float16*>(out),
                           reinterpret_cast<const Float16*>(base), sc, off, len, tile_start);
    }
  }
  const FinalizeMode mode =
      job.options->mode == AggregateMode::kDelta ? FinalizeMode::kDelta : FinalizeMode::kReplace;
  const float lr = job.options->server_lr;
  const float* acc = sc.acc.data() + off;
  const float* wsum = sc.wsum.data() + off;
  FinalizeTally tally;
  switch (job.meta->dtype) {
    case DType::kF32:
      tally = finalize_tally(reinterpret_cast<float*>(out) + off,
                             reinterpret_cast<const float*>(base) + off, acc, wsum, len, mode, lr);
      break;
    case DType::kBF16:
      tally =
          finalize_tally(reinterpret_cast<BFloat16*>(out) + off,
                         reinterpret_cast<const BFloat16*>(base) + off, acc, wsum, len, mode, lr);
      break;
    default:
      tally =
          finalize_tally(reinterpret_cast<Float16*>(out) + off,
                         reinterpret_cast<const Float16*>(base) + off, acc, wsum, len, mode, lr);
      break;
  }
  flagged = flagged || tally.nonfinite;
  return tally.covered;
}

}  // namespace

void TileSink::flush() {
  if (batch_.empty()) return;
  scatter_tile(sums_.acc, sums_.wsum, sums_.count, sums_.rows, sums_.row_len, batch_.data(),
               batch_.size());
  batch_.clear();
}

float* TileSink::made(std::size_t n) {
  made_.resize(n);
  return made_.data();
}

const std::uint32_t* TileSink::first_rows(std::size_t n) {
  made_rows_.resize(n);
  for (std::size_t r = 0; r < n; ++r) made_rows_[r] = static_cast<std::uint32_t>(r);
  return made_rows_.data();
}

void compute_tensor_rows(const TensorRows& job, const std::byte* base_rows, std::uint64_t r0,
                         std::uint64_t r1, std::byte* out, std::uint64_t stats_from_row,
                         CoverageReport& report) {
  const RowShape rs = row_shape(job.meta->shape);
  const std::size_t row_len = static_cast<std::size_t>(rs.row_len);
  const std::size_t esize = static_cast<std::size_t>(dtype_bytes(job.meta->dtype, 1));
  const AggregateOptions& opt = *job.options;
  const bool robust = opt.robust.has_value() || job.task_merge != nullptr ||
                      (opt.selection && opt.selection->rule == SelectionRule::kBulyan);
  std::uint64_t tile_elements = opt.tile_elements ? opt.tile_elements : kMaxTileElements;
  if (robust) {  // 4 more bytes per element for each share's values, within the same bytes
    const std::uint64_t per = tile_bytes_per_element(false);
    tile_elements =
        std::max<std::uint64_t>(1, tile_elements * per / (per + 4 * job.shares->size()));
  }
  const std::uint64_t tile_rows =
      opt.tile_rows
          ? opt.tile_rows
          : std::max<std::uint64_t>(1, tile_elements / std::max<std::uint64_t>(rs.row_len, 1));
  const std::size_t num_tiles = static_cast<std::size_t>((r1 - r0 + tile_rows - 1) / tile_rows);
  std::vector<TileCoverage> coverage(num_tiles);
  const bool noise = opt.clip && opt.clip->noise_multiplier > 0.0;
  const bool counts = opt.coverage_counts || noise;
  const std::size_t grain = std::max<std::size_t>(1, num_tiles / (8 * num_threads()));
  parallel_for(num_tiles, grain, [&](std::size_t tb, std::size_t te) {
    thread_local TileScratch sc;
    for (std::size_t tile = tb; tile < te; ++tile) {
      const std::uint64_t a = r0 + tile * tile_rows, b = std::min(r1, a + tile_rows);
      const std::size_t rows = static_cast<std::size_t>(b - a);
      const std::size_t n = rows * row_len;
      const std::byte* bt = base_rows + (a - r0) * row_len * esize;
      std::byte* ot = out + (a - r0) * row_len * esize;
      TileCoverage& st = coverage[tile];
      const std::uint64_t from = std::max(a, stats_from_row);
      if (!locate_shares(*job.shares, a, b, tile != tb, sc.spans)) {
        // No client reaches this tile: it keeps its bits.
        if (ot != bt) std::memcpy(ot, bt, n * esize);
        if (from < b) {
          st.any = true;
          st.min = 0;
        }
        continue;
      }
      const std::size_t nseg =
          robust ? 0 : covered_segments(*job.shares, sc.spans, row_len, sc.segs);
      if (sc.acc.size() < n) sc.acc.resize(n);
      if (sc.wsum.size() < n) sc.wsum.resize(n);
      if ((counts || robust) && sc.count.size() < n) sc.count.resize(n);
      const TileSums sums{
          sc.acc.data(), sc.wsum.data(), counts || robust ? sc.count.data() : nullptr, a,
          rows,          row_len};
      if (robust) {
        gather_and_reduce(job, sums, bt, sc);
      } else {
        accumulate(job, sums, nseg, sc, 1.0f);
      }
      if (noise) add_noise(job, sums, nseg, sc.segs);
      bool flagged = false;
      // Without counts, the covered elements are finalize's tally: of the rows from `from`
      // on (segments; with the report's max of 0 or 1 contributors) or of the whole tile.
      const std::size_t stats_row = from < b ? static_cast<std::size_t>(from - a) : rows;
      std::uint64_t tallied = 0;
      std::uint32_t tallied_max = 0;
      if (nseg == 0) {
        tallied = finalize_part(job, ot, bt, sc, 0, n, a * row_len, flagged);
      } else {
        // The tile is copied whole, in one stream, then the segments finalised over it
        // (they are at most half of it, and still in cache).
        if (ot != bt) std::memcpy(ot, bt, n * esize);
        for (std::size_t r = 0; r < rows; ++r) {
          for (const auto& [c0, c1] : sc.segs) {
            const std::uint64_t c =
                finalize_part(job, ot, bt, sc, r * row_len + c0, c1 - c0, a * row_len, flagged);
            if (r >= stats_row) {
              tallied += c;
              tallied_max = std::max<std::uint32_t>(tallied_max, c != 0 ? 1u : 0u);
            }
          }
        }
      }
      // Step 5: coverage of the counted rows (outside the segments: no contributor).
      if (from < b && nseg != 0) {
        st.any = true;
        st.min = 0;  // the segments cover at most half of each row
        if (counts) {
          for (std::size_t r = stats_row; r < rows; ++r) {
            for (const auto& [c0, c1] : sc.segs) {
              const CoverageStats cs = coverage_stats(sc.count.data() + r * row_len + c0, c1 - c0);
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
      // Step 6: results that are NaN, Inf or outside the output's range.
      if (flagged && robust) {
        switch (job.meta->dtype) {
          case DType::kF32:
            fail_nonfinite_robust(job, reinterpret_cast<const float*>(ot), sc, n, a * row_len);
            break;
          case DType::kBF16:
            fail_nonfinite_robust(job, reinterpret_cast<const BFloat16*>(ot), sc, n, a * row_len);
            break;
          default:
            fail_nonfinite_robust(job, reinterpret_cast<const Float16*>(ot), sc, n, a * row_len);
            break;
        }
      } else if (flagged) {
        const TileSums scaled{sums.acc, sums.wsum, noise ? sums.count : nullptr, a, rows, row_len};
        accumulate(job, scaled, nseg, sc, job.overflow_weight_scale);
        if (noise) add_noise(job, scaled, nseg, sc.segs);
        each_part(rows, row_len, nseg, sc.segs, [&](std::size_t off, std::size_t len) {
          refinalize_overflowed(job.overflow, ot, bt, sc.acc.data(), sc.wsum.data(), off, len,
                                a * rs.row_len);
        });
      }
    }
  });
  for (const TileCoverage& st : coverage) report.add(job.tensor, st);
}

}  // namespace edgefuse::detail
