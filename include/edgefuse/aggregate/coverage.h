// edgefuse/aggregate/coverage.h — how much of each target tensor a round's clients covered.
#pragma once

#include <cstdint>
#include <string>

namespace edgefuse {

struct TensorCoverage {
  std::string name;
  std::uint64_t elements = 0;
  std::uint64_t covered = 0;           // elements with at least one contributor
  std::uint32_t min_contributors = 0;  // over all elements (0 when any is uncovered)
  std::uint32_t max_contributors = 0;
  double fraction() const noexcept {
    return elements ? static_cast<double>(covered) / static_cast<double>(elements) : 0.0;
  }
};

}  // namespace edgefuse
