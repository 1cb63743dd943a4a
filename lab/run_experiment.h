// `edgefuse-lab run EXPERIMENT.json --out DIR`: every method for every seed, then the outputs
// of lab/report.h in DIR.
//
// Nothing is half-written: the experiment and its text are checked before DIR is touched; the
// run works in a staging folder beside DIR (".DIR.lab-staging") and moves it onto DIR only when
// everything is written. DIR must not exist, unless `replace` is set and DIR holds an earlier
// run's results.json. DIR/models/<method>-seed<k> keeps each run's final target.
#pragma once

#include <filesystem>
#include <iosfwd>

#include "lab/experiment.h"

namespace edgefuse::lab {

struct RunOptions {
  std::filesystem::path out;
  bool replace = false;
  bool quiet = false;  // no per-round progress lines
};

// Runs the experiment, printing progress and the table to `log`. Returns 0. Throws Error
// for bad input (then DIR is as it was).
int run_experiment(const Experiment& experiment, const RunOptions& options, std::ostream& log);

}  // namespace edgefuse::lab
