// edgefuse/aggregate/low_rank.h — a client's update as low-rank deltas (LoRA factors) to
// target tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace edgefuse {

// A low-rank delta to one target tensor (a LoRA adapter's B·A, lifted into the target):
// ΔW = scale · L · R in the layout the target tensor is stored in (fan_in_fan_out and
// embedding weights pass A^T and B^T), f32 row-major, compact: it covers only the target rows
// `rows` and columns `cols` (sorted, distinct; empty = all), and L holds one row of `rank`
// values per covered row (rows.size() x rank, or all rows x rank), R one column per covered
// column (rank x cols.size(), or rank x all columns). There it counts like a delta client's
// value, elsewhere not at all. Compact factors are what a sub-model's adapter trained: a
// width-1/8 client's delta to a 9216 x 24576 weight holds 1/8 of the values a lifted one would.
struct LowRankDelta {
  std::string tensor;
  std::size_t rank = 0;
  float scale = 1.0f;
  std::vector<float> l, r;
  std::vector<std::uint32_t> rows, cols;
};

// Makes a low-rank client's delta to the named target tensor on demand
// (Aggregator::add_low_rank).
using LowRankSource = std::function<LowRankDelta(const std::string& tensor)>;

}  // namespace edgefuse
