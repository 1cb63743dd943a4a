// edgefuse/kernels/scatter.h — coverage-weighted scatter of client sub-tensors into a tile.
//
// The accumulation half of HeteroFL's `combine` (Diao et al., ICLR 2021):
// each client's local tensor is the gather W[O, I] of the target, and the server adds
// a * L[e] into a sum and a into a coverage weight at the target positions e it came from.
// Here the target is processed in tiles of rows; a source describes one client's
// contribution to one tile: which tile rows its local rows land on, and which stretches
// (runs) of a local row land where in a target row. Elements no source covers are left alone.
//
// Numerics: per element, sources are added in the order given, each as acc = fl(acc +
// fl(w * x)) and wsum = fl(wsum + w) in f32 with no FMA; results are bitwise identical on
// every SIMD target and thread count (parallel chunks are fixed row ranges) and equal the
// scalar loop. One runtime dispatch per call.
//
//   edgefuse::ScatterRun run{0, 0, 3};                      // local cols 0..2 -> cols 0..2
//   std::uint32_t dst[] = {0, 1}, src[] = {0, 1};
//   edgefuse::ScatterSource s{x, edgefuse::DType::kBF16, 2, 3, dst, src, 2, &run, 1, 1.0f};
//   edgefuse::scatter_accumulate(acc, wsum, nullptr, 4, 6, &s, 1);
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

// x[src + j] of a local row lands at position dst + j of a target row, for j < len.
struct ScatterRun {
  std::uint64_t dst;
  std::uint64_t src;
  std::uint64_t len;
};

// One client's contribution to a tile. The local tensor is read as [x_rows, x_row_len]
// elements of dtype (F32, BF16 or F16). Local row src_rows[r] lands on tile row dst_rows[r].
struct ScatterSource {
  const void* x;
  DType dtype;
  std::uint64_t x_rows;
  std::uint64_t x_row_len;
  const std::uint32_t* dst_rows;  // strictly increasing, < tile_rows
  const std::uint32_t* src_rows;  // < x_rows
  std::size_t num_rows;
  const ScatterRun* runs;  // dst strictly increasing and non-overlapping, inside both rows
  std::size_t num_runs;
  float weight;              // finite and >= 0
  float value_scale = 1.0f;  // finite and >= 0: x counts with w·value_scale (norm clipping)
};

// For each source s in order, each r < num_rows and each run, with w = s.weight and
// wx = fl(w * s.value_scale) (w itself for a scale of 1):
//   acc [dst_rows[r] * row_len + run.dst + j] += wx * x[src_rows[r] * x_row_len + run.src + j]
//   wsum[same] += w;   count[same] += 1 (when count is not null)
// acc, wsum and count hold tile_rows * row_len elements. Throws Error (writing nothing) for a
// weight that is negative or not finite, a dtype other than F32/BF16/F16, rows or runs out of
// range or out of order, null pointers where elements exist, or x overlapping the outputs.
// Does not allocate.
void scatter_accumulate(float* acc, float* wsum, std::uint32_t* count, std::size_t tile_rows,
                        std::size_t row_len, const ScatterSource* sources, std::size_t num_sources);

// Summary of a tile's contributor counts: how many are non-zero, and their min and max
// (min = UINT32_MAX, max = 0 and covered = 0 for n = 0). Throws Error if count is null while
// n > 0. Does not allocate.
struct CoverageStats {
  std::uint64_t covered;
  std::uint32_t min;
  std::uint32_t max;
};
CoverageStats coverage_stats(const std::uint32_t* count, std::size_t n);
// Number of elements with wsum > 0 (a covered element when counts are not kept).
std::uint64_t count_positive(const float* wsum, std::size_t n);

}  // namespace edgefuse
