// Private: rows of one target tensor computed from its shares, tile by tile.
//
// Each tile of target rows is one pass of named steps: locate each share's rows in it, find
// the columns the shares present cover (a few narrow segments are summed and finalised
// alone, the rest of the row copied), clear the sums, let every share emit into them in
// order, finalise into the output, count coverage, and compute again the elements whose
// result overflowed. Tiles are spread over the threads; every element sums its shares in
// the same order whatever the tile size or thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/aggregate/coverage_report.h"
#include "src/aggregate/overflow.h"
#include "src/aggregate/share.h"
#include "src/aggregate/task_merge_pass.h"

namespace edgefuse::detail {

struct TensorRows {
  std::size_t tensor;      // layout index
  const TensorMeta* meta;  // F32, BF16 or F16
  const std::vector<const Share*>* shares;
  const AggregateOptions* options;
  OverflowContext overflow;
  float overflow_weight_scale;  // overflow_scale() of every client's weight
  // A server optimizer (options->server) and the tensor's state from flat element
  // `server_first` on (the rows being computed), or null.
  const ServerStep* server = nullptr;
  float* server_m = nullptr;
  float* server_v = nullptr;
  std::uint64_t server_first = 0;
  // A full-model task merge (options->task_merge), planned for this tensor, or null.
  const TensorTaskMerge* task_merge = nullptr;
};

// Rows [r0, r1) of the tensor into `out` from the target's same rows at `base_rows` (both
// row-major in its dtype; out may equal base_rows). Coverage of rows >= stats_from_row is
// added to `report`.
void compute_tensor_rows(const TensorRows& job, const std::byte* base_rows, std::uint64_t r0,
                         std::uint64_t r1, std::byte* out, std::uint64_t stats_from_row,
                         CoverageReport& report);

}  // namespace edgefuse::detail
