// Private: the coverage report, merged tile by tile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "edgefuse/aggregate/coverage.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse::detail {

// The contributors of the counted elements of one tile; `any` is false when it counts none.
struct TileCoverage {
  std::uint64_t covered = 0;
  std::uint32_t min = std::numeric_limits<std::uint32_t>::max(), max = 0;
  bool any = false;
};

class CoverageReport {
 public:
  // Every tensor of the layout, nothing counted yet.
  void reset(const ModelLayout& layout);
  bool empty() const noexcept { return tensors_.empty(); }
  void add(std::size_t tensor, const TileCoverage& tile);
  const std::vector<TensorCoverage>& tensors() const noexcept { return tensors_; }

 private:
  std::vector<TensorCoverage> tensors_;
  std::vector<bool> counted_;  // by tensor: min_contributors holds a counted value
};

}  // namespace edgefuse::detail
