// Private: a tensor's coverage as the note of its line in the resume journal, and back, so
// that a resumed run reports the coverage of the tensors it kept.
#pragma once

#include <string>
#include <string_view>

#include "edgefuse/aggregate/coverage.h"

namespace edgefuse::detail {

std::string coverage_note(const TensorCoverage& c);
// An unreadable note gives zero counts.
TensorCoverage coverage_of_note(std::string_view name, std::string_view note);

}  // namespace edgefuse::detail
