// Dispatch unit and argument checks for kernels/scatter.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/scatter.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/scatter-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

void ScatterTile(float* acc, float* wsum, std::uint32_t* count, std::size_t row_len,
                 const ScatterSource* sources, std::size_t num_sources, std::size_t row_begin,
                 std::size_t row_end) {
  ScatterTileRows(acc, wsum, count, row_len, sources, num_sources, row_begin, row_end);
}

CoverageStats CoverageStatsU32(const std::uint32_t* count, std::size_t n) {
  return CoverageStatsArray(count, n);
}
std::uint64_t CountPositiveF32(const float* wsum, std::size_t n) {
  return CountPositiveArray(wsum, n);
}

void FillF32(float* HWY_RESTRICT p, std::size_t n, float v) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vv = hn::Set(df, v);
  std::size_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    hn::StoreU(vv, df, p + i);
    hn::StoreU(vv, df, p + i + N);
    hn::StoreU(vv, df, p + i + 2 * N);
    hn::StoreU(vv, df, p + i + 3 * N);
  }
  for (; i + N <= n; i += N) hn::StoreU(vv, df, p + i);
  for (; i < n; ++i) p[i] = v;
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "edgefuse/core/parallel.h"
#include "src/kernels/dispatch.h"
#include "src/kernels/tile.h"

namespace edgefuse {

HWY_EXPORT(ScatterTile);
HWY_EXPORT(CoverageStatsU32);
HWY_EXPORT(CountPositiveF32);
HWY_EXPORT(FillF32);

void detail::fill_f32(float* p, std::size_t n, float v) {
  EDGEFUSE_DASSERT(n == 0 || p != nullptr);
  if (n == 0) return;
  HWY_DYNAMIC_DISPATCH(FillF32)(p, n, v);
}

CoverageStats coverage_stats(const std::uint32_t* count, std::size_t n) {
  detail::check_pointer("coverage_stats", "count", count, n);
  CoverageStats total{0, 0xFFFFFFFFu, 0};
  if (n == 0) return total;
  detail::init_dispatch();
  const auto kernel = HWY_DYNAMIC_DISPATCH(CoverageStatsU32);
  // Pieces below 2^31 keep the u32 lane totals from overflowing.
  for (std::size_t b = 0; b < n; b += std::size_t{1} << 31) {
    const CoverageStats s = kernel(count + b, std::min(n - b, std::size_t{1} << 31));
    total.covered += s.covered;
    total.min = std::min(total.min, s.min);
    total.max = std::max(total.max, s.max);
  }
  return total;
}

std::uint64_t count_positive(const float* wsum, std::size_t n) {
  detail::check_pointer("count_positive", "wsum", wsum, n);
  if (n == 0) return 0;
  detail::init_dispatch();
  return HWY_DYNAMIC_DISPATCH(CountPositiveF32)(wsum, n);
}

namespace {

void check_source(const ScatterSource& s, std::size_t i, std::size_t tile_rows, std::size_t row_len,
                  const void* acc, const void* wsum, const void* count, std::size_t tile_elems) {
  constexpr const char* kFn = "scatter_accumulate";
  if (!(s.weight - s.weight == 0.0f) || s.weight < 0.0f) {
    detail::fail(kFn, ": sources[", i, "].weight = ", s.weight, " is negative or not finite");
  }
  if (!(s.value_scale - s.value_scale == 0.0f) || s.value_scale < 0.0f) {
    detail::fail(kFn, ": sources[", i, "].value_scale = ", s.value_scale,
                 " is negative or not finite");
  }
  if (s.dtype != DType::kF32 && s.dtype != DType::kBF16 && s.dtype != DType::kF16) {
    detail::fail(kFn, ": sources[", i, "].dtype is ", dtype_name(s.dtype),
                 "; expected F32, BF16 or F16");
  }
  const std::uint64_t x_elems = s.x_rows * s.x_row_len;
  if (s.x_row_len != 0 && x_elems / s.x_row_len != s.x_rows) {
    detail::fail(kFn, ": sources[", i, "] size overflows");
  }
  detail::check_pointer(kFn, "sources[].x", s.x, x_elems);
  detail::check_pointer(kFn, "sources[].dst_rows", s.dst_rows, s.num_rows);
  detail::check_pointer(kFn, "sources[].src_rows", s.src_rows, s.num_rows);
  detail::check_pointer(kFn, "sources[].runs", s.runs, s.num_runs);
  for (std::size_t r = 0; r < s.num_rows; ++r) {
    if (s.dst_rows[r] >= tile_rows || (r > 0 && s.dst_rows[r] <= s.dst_rows[r - 1])) {
      detail::fail(kFn, ": sources[", i, "].dst_rows[", r, "] = ", s.dst_rows[r],
                   " is out of order or not below tile_rows ", tile_rows);
    }
    if (s.src_rows[r] >= s.x_rows) {
      detail::fail(kFn, ": sources[", i, "].src_rows[", r, "] = ", s.src_rows[r],
                   " is not below x_rows ", s.x_rows);
    }
  }
  std::uint64_t prev_end = 0;
  for (std::size_t k = 0; k < s.num_runs; ++k) {
    const ScatterRun& run = s.runs[k];
    if (run.len == 0 || run.dst < prev_end || run.dst > row_len || run.len > row_len - run.dst ||
        run.src > s.x_row_len || run.len > s.x_row_len - run.src) {
      detail::fail(kFn, ": sources[", i, "].runs[", k, "] = (dst ", run.dst, ", src ", run.src,
                   ", len ", run.len, ") is empty, out of order or outside a row (row_len ",
                   row_len, ", x_row_len ", s.x_row_len, ")");
    }
    prev_end = run.dst + run.len;
  }
  const std::size_t x_bytes = static_cast<std::size_t>(dtype_bytes(s.dtype, x_elems));
  detail::check_disjoint(kFn, "acc", acc, tile_elems * 4, "sources[].x", s.x, x_bytes);
  detail::check_disjoint(kFn, "wsum", wsum, tile_elems * 4, "sources[].x", s.x, x_bytes);
  if (count != nullptr) {
    detail::check_disjoint(kFn, "count", count, tile_elems * 4, "sources[].x", s.x, x_bytes);
  }
}

// scatter_accumulate()'s contract (kernels/scatter.h); throws Error naming the broken rule.
void check_sources(const float* acc, const float* wsum, const std::uint32_t* count,
                   std::size_t tile_rows, std::size_t row_len, const ScatterSource* sources,
                   std::size_t num_sources) {
  constexpr const char* kFn = "scatter_accumulate";
  const std::size_t tile_elems = tile_rows * row_len;
  if (row_len != 0 && tile_elems / row_len != tile_rows) detail::fail(kFn, ": tile size overflows");
  detail::check_pointer(kFn, "acc", acc, tile_elems);
  detail::check_pointer(kFn, "wsum", wsum, tile_elems);
  detail::check_pointer(kFn, "sources", sources, num_sources);
  detail::check_disjoint(kFn, "acc", acc, tile_elems * 4, "wsum", wsum, tile_elems * 4);
  if (count != nullptr) {
    detail::check_disjoint(kFn, "count", count, tile_elems * 4, "acc", acc, tile_elems * 4);
    detail::check_disjoint(kFn, "count", count, tile_elems * 4, "wsum", wsum, tile_elems * 4);
  }
  for (std::size_t i = 0; i < num_sources; ++i) {
    check_source(sources[i], i, tile_rows, row_len, acc, wsum, count, tile_elems);
  }
}

}  // namespace

void detail::scatter_tile(float* acc, float* wsum, std::uint32_t* count, std::size_t tile_rows,
                          std::size_t row_len, const ScatterSource* sources,
                          std::size_t num_sources) {
  EDGEFUSE_DASSERT(detail::holds(
      [&] { check_sources(acc, wsum, count, tile_rows, row_len, sources, num_sources); }));
  if (tile_rows == 0 || row_len == 0 || num_sources == 0) return;
  detail::init_dispatch();
  HWY_DYNAMIC_DISPATCH(ScatterTile)(acc, wsum, count, row_len, sources, num_sources, 0, tile_rows);
}

void scatter_accumulate(float* acc, float* wsum, std::uint32_t* count, std::size_t tile_rows,
                        std::size_t row_len, const ScatterSource* sources,
                        std::size_t num_sources) {
  check_sources(acc, wsum, count, tile_rows, row_len, sources, num_sources);
  const std::size_t tile_elems = tile_rows * row_len;
  if (tile_elems == 0 || num_sources == 0) return;
  detail::init_dispatch();
  const auto kernel = HWY_DYNAMIC_DISPATCH(ScatterTile);
  // Fixed row chunks of about kStreamGrain elements: the partition depends on the tile only.
  const std::size_t grain =
      std::max<std::size_t>(1, detail::kStreamGrain / std::max<std::size_t>(row_len, 1));
  parallel_for(tile_rows, grain, [&](std::size_t b, std::size_t e) {
    kernel(acc, wsum, count, row_len, sources, num_sources, b, e);
  });
}

}  // namespace edgefuse
#endif  // HWY_ONCE
