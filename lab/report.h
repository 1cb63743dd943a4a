// What `edgefuse-lab run` writes and prints for an experiment's runs:
//   results.json  per method and seed: held-out bits per character per group and overall
//                 after every round (round 0: the initial model) and the payload bytes each
//                 client sent and received per round; then the summary below. Byte-identical
//                 for the same experiment file, seeds and thread count (no wall times in it);
//   timing.json   wall seconds per method, seed and round (varies run to run);
//   bpc.tsv       per round, each method's overall bits per character: mean, min and max over
//                 the seeds;
//   bpc.png       that plot (mean line in a min-max band; drawn by gnuplot when installed);
// and the table: per method, the final overall bits per character (mean, min-max over seeds)
// and the gap closed, (largest_alone - method) / (largest_alone - central) per seed.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "lab/experiment.h"
#include "lab/federated.h"

namespace edgefuse::lab {

// The share of the gap between the largest tier alone and central training that a method
// closes: 0 = no better than the largest tier alone, 1 = as good as central training. NaN
// when central is not better than the largest tier alone (no gap to close).
double gap_closed(double largest_alone, double central, double method);

struct Spread {
  double mean = 0.0, min = 0.0, max = 0.0;
};
Spread spread_of(const std::vector<double>& values);

struct MethodSummary {
  Method method;
  std::vector<double> final_overall;  // per seed, in experiment order
  std::vector<double> gap;            // per seed; empty without largest_alone and central
};

// Summaries in the experiment's method order; runs holds every (method, seed) pair.
std::vector<MethodSummary> summarize(const Experiment& experiment,
                                     const std::vector<MethodRun>& runs);

// results.json's text (deterministic).
std::string results_json(const Experiment& experiment, const std::vector<MethodRun>& runs,
                         const std::vector<std::int64_t>& client_parameters,
                         std::int64_t model_parameters);

// The printed table.
std::string summary_table(const Experiment& experiment,
                          const std::vector<MethodSummary>& summaries);

// Writes results.json, timing.json, bpc.tsv and bpc.gp into `dir` and runs gnuplot there;
// returns the plot's path, or "" when gnuplot did not draw it.
std::filesystem::path write_outputs(const std::filesystem::path& dir, const Experiment& experiment,
                                    const std::vector<MethodRun>& runs,
                                    const std::vector<std::int64_t>& client_parameters,
                                    std::int64_t model_parameters);

}  // namespace edgefuse::lab
