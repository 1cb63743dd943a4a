// Per-target bodies of the coverage scatter (kernels/scatter.h).

#if defined(EDGEFUSE_SRC_KERNELS_SCATTER_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_SCATTER_INL_H_
#undef EDGEFUSE_SRC_KERNELS_SCATTER_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_SCATTER_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "edgefuse/kernels/scatter.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// acc[i] = fl(acc[i] + fl(wx * x[i])); wsum[i] = fl(wsum[i] + w). Both streams in one pass,
// so the tile (which fits in L2) is read once per run.
template <typename T>
HWY_INLINE void ScatterRunArray(float* HWY_RESTRICT acc, float* HWY_RESTRICT wsum,
                                const T* HWY_RESTRICT x, std::size_t n, float w, float wx) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vw = hn::Set(df, w);
  const auto vx = hn::Set(df, wx);
  std::size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto x0 = LoadF32(df, x + i);
    const auto x1 = LoadF32(df, x + i + N);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i), hn::Mul(vx, x0)), df, acc + i);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i + N), hn::Mul(vx, x1)), df, acc + i + N);
    hn::StoreU(hn::Add(hn::LoadU(df, wsum + i), vw), df, wsum + i);
    hn::StoreU(hn::Add(hn::LoadU(df, wsum + i + N), vw), df, wsum + i + N);
  }
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i), hn::Mul(vx, LoadF32(df, x + i))), df, acc + i);
    hn::StoreU(hn::Add(hn::LoadU(df, wsum + i), vw), df, wsum + i);
  }
  for (; i < n; ++i) {
    acc[i] += wx * ScalarToF32(x[i]);
    wsum[i] += w;
  }
}

// Row r of source s (its runs) added to the target row at acc/wsum/count + dst_row.
template <typename T>
HWY_INLINE void ScatterSourceRow(float* acc, float* wsum, std::uint32_t* count,
                                 const ScatterSource& s, std::size_t r, std::size_t dst_row) {
  const T* xrow = static_cast<const T*>(s.x) + std::size_t{s.src_rows[r]} * s.x_row_len;
  for (std::size_t k = 0; k < s.num_runs; ++k) {
    const ScatterRun& run = s.runs[k];
    ScatterRunArray(acc + dst_row + run.dst, wsum + dst_row + run.dst, xrow + run.src, run.len,
                    s.weight, s.weight * s.value_scale);
    if (count != nullptr) {
      std::uint32_t* c = count + dst_row + run.dst;
      for (std::size_t j = 0; j < run.len; ++j) c[j] += 1;
    }
  }
}

HWY_INLINE void ScatterOneRow(float* acc, float* wsum, std::uint32_t* count, std::size_t dst_row,
                              const ScatterSource& s, std::size_t r) {
  if (s.dtype == DType::kBF16) {
    ScatterSourceRow<BFloat16>(acc, wsum, count, s, r, dst_row);
  } else if (s.dtype == DType::kF16) {
    ScatterSourceRow<Float16>(acc, wsum, count, s, r, dst_row);
  } else {
    ScatterSourceRow<float>(acc, wsum, count, s, r, dst_row);
  }
}

// Whether two sources read and write the same positions: the same dtype and runs.
HWY_INLINE bool SameRuns(const ScatterSource& a, const ScatterSource& b) {
  if (a.dtype != b.dtype || a.num_runs != b.num_runs) return false;
  if (a.runs == b.runs) return true;
  for (std::size_t k = 0; k < a.num_runs; ++k) {
    if (a.runs[k].dst != b.runs[k].dst || a.runs[k].src != b.runs[k].src ||
        a.runs[k].len != b.runs[k].len) {
      return false;
    }
  }
  return true;
}

constexpr std::size_t kSourceGroup = 64;

// The rows `rows[j]` of m >= 2 sources with the same runs (srcs[j]) added to the target row at
// dst_row: per element, acc and wsum are loaded once, the sources added in order in registers
// (acc = fl(acc + fl(w_j * x_j)), wsum = fl(wsum + w_j), the same operations as one source
// at a time) and stored once.
template <typename T>
HWY_INLINE void ScatterFusedRow(float* acc, float* wsum, std::uint32_t* count,
                                const ScatterSource* const* srcs, const std::size_t* rows,
                                std::size_t m, std::size_t dst_row) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const T* xrow[kSourceGroup];
  float w[kSourceGroup], wx[kSourceGroup];
  for (std::size_t j = 0; j < m; ++j) {
    xrow[j] = static_cast<const T*>(srcs[j]->x) +
              std::size_t{srcs[j]->src_rows[rows[j]]} * srcs[j]->x_row_len;
    w[j] = srcs[j]->weight;
    wx[j] = srcs[j]->weight * srcs[j]->value_scale;
  }
  const ScatterSource& s0 = *srcs[0];
  for (std::size_t k = 0; k < s0.num_runs; ++k) {
    const ScatterRun& run = s0.runs[k];
    float* HWY_RESTRICT a = acc + dst_row + run.dst;
    float* HWY_RESTRICT ws = wsum + dst_row + run.dst;
    const std::size_t len = static_cast<std::size_t>(run.len),
                      src = static_cast<std::size_t>(run.src);
    std::size_t i = 0;
    for (; i + N <= len; i += N) {
      auto va = hn::LoadU(df, a + i);
      auto vs = hn::LoadU(df, ws + i);
      for (std::size_t j = 0; j < m; ++j) {
        va = hn::Add(va, hn::Mul(hn::Set(df, wx[j]), LoadF32(df, xrow[j] + src + i)));
        vs = hn::Add(vs, hn::Set(df, w[j]));
      }
      hn::StoreU(va, df, a + i);
      hn::StoreU(vs, df, ws + i);
    }
    for (; i < len; ++i) {
      float av = a[i], sv = ws[i];
      for (std::size_t j = 0; j < m; ++j) {
        av += wx[j] * ScalarToF32(xrow[j][src + i]);
        sv += w[j];
      }
      a[i] = av;
      ws[i] = sv;
    }
    if (count != nullptr) {
      std::uint32_t* c = count + dst_row + run.dst;
      for (std::size_t j = 0; j < len; ++j) c[j] += static_cast<std::uint32_t>(m);
    }
  }
}

HWY_INLINE void ScatterFused(float* acc, float* wsum, std::uint32_t* count,
                             const ScatterSource* const* srcs, const std::size_t* rows,
                             std::size_t m, std::size_t dst_row) {
  if (srcs[0]->dtype == DType::kBF16) {
    ScatterFusedRow<BFloat16>(acc, wsum, count, srcs, rows, m, dst_row);
  } else if (srcs[0]->dtype == DType::kF16) {
    ScatterFusedRow<Float16>(acc, wsum, count, srcs, rows, m, dst_row);
  } else {
    ScatterFusedRow<float>(acc, wsum, count, srcs, rows, m, dst_row);
  }
}

// Splits sources[0, n) into classes of the same runs: cls[i] is source i's class, numbered
// in order of first appearance, *classes their number. Returns true when some class has two
// sources and the classes' runs are pairwise disjoint (then no element gets additions from
// two classes, and a row's sources may go class by class, each class's in order, without
// changing any element's sequence of additions). Gives up (false) beyond kMaxClasses
// classes or kMaxClassRuns runs, so a tile of many unlike clients pays little for the look.
constexpr std::size_t kMaxClasses = 16;
constexpr std::size_t kMaxClassRuns = 256;
HWY_INLINE bool FusibleClasses(const ScatterSource* sources, std::size_t n, std::uint8_t* cls,
                               std::size_t* classes) {
  std::size_t first[kMaxClasses];  // each class's first source
  std::size_t nc = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::size_t c = 0;
    while (c < nc && !SameRuns(sources[first[c]], sources[i])) ++c;
    if (c == nc) {
      if (nc == kMaxClasses) return false;
      first[nc++] = i;
    }
    cls[i] = static_cast<std::uint8_t>(c);
  }
  *classes = nc;
  if (nc == n) return false;  // no class has two sources
  std::pair<std::uint64_t, std::uint64_t> iv[kMaxClassRuns];
  std::size_t m = 0;
  for (std::size_t c = 0; c < nc; ++c) {
    const ScatterSource& s = sources[first[c]];
    for (std::size_t k = 0; k < s.num_runs; ++k) {
      if (m == kMaxClassRuns) return false;
      iv[m++] = {s.runs[k].dst, s.runs[k].dst + s.runs[k].len};
    }
  }
  std::sort(iv, iv + m);
  for (std::size_t k = 1; k < m; ++k) {
    if (iv[k].first < iv[k - 1].second) return false;
  }
  return true;
}

// Tile rows [row_begin, row_end): every source's rows that land there, sources in order for
// each element. Rows of at least kRowMajorMin elements go row by row, all sources of a row
// before the next row, so the row's sums stay in L1 while every source adds to it; shorter
// rows go source by source. The additions to each element are the same, in the same order.
constexpr std::size_t kRowMajorMin = 128;
constexpr std::size_t kPrefetchRows = 2;
HWY_INLINE void ScatterTileRows(float* acc, float* wsum, std::uint32_t* count, std::size_t row_len,
                                const ScatterSource* sources, std::size_t num_sources,
                                std::size_t row_begin, std::size_t row_end) {
  const std::uint32_t end_row = static_cast<std::uint64_t>(row_end) > UINT32_MAX
                                    ? UINT32_MAX
                                    : static_cast<std::uint32_t>(row_end);
  auto range = [&](const ScatterSource& s) {
    const std::uint32_t* end = s.dst_rows + s.num_rows;
    const auto r0 = static_cast<std::size_t>(
        std::lower_bound(s.dst_rows, end, static_cast<std::uint32_t>(row_begin)) - s.dst_rows);
    const auto r1 =
        static_cast<std::size_t>(std::lower_bound(s.dst_rows + r0, end, end_row) - s.dst_rows);
    return std::pair<std::size_t, std::size_t>(r0, r1);
  };
  if (row_len < kRowMajorMin) {
    for (std::size_t i = 0; i < num_sources; ++i) {
      const ScatterSource& s = sources[i];
      const auto [r0, r1] = range(s);
      for (std::size_t r = r0; r < r1; ++r) {
        ScatterOneRow(acc, wsum, count, std::size_t{s.dst_rows[r]} * row_len, s, r);
      }
    }
    return;
  }
  // Groups of sources in order; within a group, row by row.
  std::size_t cur[kSourceGroup], last[kSourceGroup];
  for (std::size_t g0 = 0; g0 < num_sources; g0 += kSourceGroup) {
    const std::size_t gn = std::min(kSourceGroup, num_sources - g0);
    std::size_t lo = row_end, hi = row_begin;
    for (std::size_t i = 0; i < gn; ++i) {
      const auto [r0, r1] = range(sources[g0 + i]);
      cur[i] = r0;
      last[i] = r1;
      if (r0 < r1) {
        lo = std::min<std::size_t>(lo, sources[g0 + i].dst_rows[r0]);
        hi = std::max<std::size_t>(hi, std::size_t{sources[g0 + i].dst_rows[r1 - 1]} + 1);
      }
    }
    // Each source is its own stream of short rows, too many for the hardware prefetcher:
    // ask for the source's row kPrefetchRows ahead while this one is added.
    auto prefetch = [&](std::size_t i) {
      const ScatterSource& s = sources[g0 + i];
      if (cur[i] + kPrefetchRows >= last[i]) return;
      const std::size_t esize = s.dtype == DType::kF32 ? 4 : 2;
      const char* xrow = static_cast<const char*>(s.x) +
                         std::size_t{s.src_rows[cur[i] + kPrefetchRows]} * s.x_row_len * esize;
      for (std::size_t q = 0; q < s.num_runs; ++q) {
        const char* p = xrow + s.runs[q].src * esize;
        for (std::size_t off = 0; off < s.runs[q].len * esize; off += 64) hwy::Prefetch(p + off);
      }
    };
    auto here = [&](std::size_t i, std::size_t row) {
      return cur[i] != last[i] && sources[g0 + i].dst_rows[cur[i]] == row;
    };
    std::uint8_t cls[kSourceGroup];
    std::size_t classes = 0;
    if (!FusibleClasses(sources + g0, gn, cls, &classes)) {
      for (std::size_t row = lo; row < hi; ++row) {
        for (std::size_t i = 0; i < gn; ++i) {
          if (!here(i, row)) continue;
          prefetch(i);
          ScatterOneRow(acc, wsum, count, row * row_len, sources[g0 + i], cur[i]);
          ++cur[i];
        }
      }
      continue;
    }
    // Class by class: the sources of a class that reach this row (in order), added together.
    std::uint8_t in_class[kMaxClasses][kSourceGroup];
    std::size_t size[kMaxClasses];
    const ScatterSource* members[kSourceGroup];
    std::size_t rows[kSourceGroup];
    for (std::size_t row = lo; row < hi; ++row) {
      std::fill(size, size + classes, std::size_t{0});
      for (std::size_t i = 0; i < gn; ++i) {
        if (!here(i, row)) continue;
        prefetch(i);
        in_class[cls[i]][size[cls[i]]++] = static_cast<std::uint8_t>(i);
      }
      for (std::size_t c = 0; c < classes; ++c) {
        const std::size_t m = size[c];
        if (m == 0) continue;
        for (std::size_t j = 0; j < m; ++j) {
          const std::size_t i = in_class[c][j];
          members[j] = &sources[g0 + i];
          rows[j] = cur[i]++;
        }
        if (m == 1) {
          ScatterOneRow(acc, wsum, count, row * row_len, *members[0], rows[0]);
        } else {
          ScatterFused(acc, wsum, count, members, rows, m, row * row_len);
        }
      }
    }
  }
}

// Non-zero count, min and max of u32 counts. Lane totals are u32: n < 2^32 per call.
HWY_INLINE CoverageStats CoverageStatsArray(const std::uint32_t* HWY_RESTRICT c, std::size_t n) {
  const hn::ScalableTag<std::uint32_t> du;
  const std::size_t N = hn::Lanes(du);
  auto vmin = hn::Set(du, 0xFFFFFFFFu), vmax = hn::Zero(du), vcov = hn::Zero(du);
  const auto one = hn::Set(du, 1u);
  std::size_t i = 0;
  for (; i + N <= n; i += N) {
    const auto v = hn::LoadU(du, c + i);
    vmin = hn::Min(vmin, v);
    vmax = hn::Max(vmax, v);
    vcov = hn::Add(vcov, hn::Min(v, one));
  }
  HWY_ALIGN std::uint32_t lanes_min[hn::MaxLanes(du)], lanes_max[hn::MaxLanes(du)],
      lanes_cov[hn::MaxLanes(du)];
  hn::Store(vmin, du, lanes_min);
  hn::Store(vmax, du, lanes_max);
  hn::Store(vcov, du, lanes_cov);
  CoverageStats st{0, 0xFFFFFFFFu, 0};
  for (std::size_t k = 0; k < N; ++k) {
    st.covered += lanes_cov[k];
    st.min = lanes_min[k] < st.min ? lanes_min[k] : st.min;
    st.max = lanes_max[k] > st.max ? lanes_max[k] : st.max;
  }
  for (; i < n; ++i) {
    st.covered += c[i] != 0;
    st.min = c[i] < st.min ? c[i] : st.min;
    st.max = c[i] > st.max ? c[i] : st.max;
  }
  return st;
}

HWY_INLINE std::uint64_t CountPositiveArray(const float* HWY_RESTRICT w, std::size_t n) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  std::uint64_t total = 0;
  std::size_t i = 0;
  for (; i + N <= n; i += N) total += hn::CountTrue(df, hn::Gt(hn::LoadU(df, w + i), hn::Zero(df)));
  for (; i < n; ++i) total += w[i] > 0.0f;
  return total;
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
