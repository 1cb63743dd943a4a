// `edgefuse simulate`: a fusion round at any scale over generated tensors (engine/simulate.h),
// its output hashed with XXH3-64 (the xxHash library) in layout order.
#pragma once

#include <string>

#include "edgefuse/engine/simulate.h"

namespace edgefuse::cli {

struct SimulateArgs {
  SimulationOptions options;
  std::string memory_budget = "2GiB";
  bool dry_run = false;  // print the shapes only
  bool quiet = false;    // no progress lines
};

int run_simulate(SimulateArgs args);

}  // namespace edgefuse::cli
