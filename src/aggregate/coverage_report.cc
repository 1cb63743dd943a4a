// The coverage report (src/aggregate/coverage_report.h).
#include "src/aggregate/coverage_report.h"

#include <algorithm>

namespace edgefuse::detail {

void CoverageReport::reset(const ModelLayout& layout) {
  tensors_.clear();
  for (const auto& t : layout.tensors()) {
    TensorCoverage c;
    c.name = t.meta.name;
    c.elements = t.meta.shape.numel();
    tensors_.push_back(std::move(c));
  }
  counted_.assign(tensors_.size(), false);
}

void CoverageReport::add(std::size_t tensor, const TileCoverage& tile) {
  if (!tile.any) return;
  TensorCoverage& c = tensors_[tensor];
  c.covered += tile.covered;
  c.min_contributors = counted_[tensor] ? std::min(c.min_contributors, tile.min) : tile.min;
  counted_[tensor] = true;
  c.max_contributors = std::max(c.max_contributors, tile.max);
}

}  // namespace edgefuse::detail
