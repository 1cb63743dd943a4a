// One method of an experiment run for one seed: the rounds of federated learning (or of
// central training) of the target, evaluated on the held-out text after every round.
//
// Every round starts from the current target (round 0: initial_model(seed), the same for
// every method), and
//   largest_alone  the clients of width 1 and layers 1 train the whole model (local_steps Adam
//                  steps each, a fresh optimizer every round) and send their deltas; the
//                  engine fuses them (run_fusion, delta mode, weights = training bytes);
//   heterofl       every client gets the sub-model its width and depth allow, cut by static
//                  prefixes (HeteroFL), trains it and sends its delta; the engine fuses all of
//                  them by coverage (each element: the weighted mean over the clients that
//                  hold it; elements no client holds keep their value);
//   fedrolex       the same with rolling windows that move one index per round (FedRolex);
//   kd             every client gets its sub-model (distill.policy), trains it, and sends its
//                  logits on the server's proxy text instead of weights (a teacher signal
//                  file, bf16); the server aggregates them with the teacher rule (weights =
//                  training bytes) and trains the target against that teacher for
//                  distill.steps Adam steps (a fresh optimizer every round; loss: forward KL
//                  at distill.temperature with the T^2 factor, the proxy's own next bytes are
//                  not used) — FedDF's server step;
//   hybrid         the clients send both; the engine fuses the deltas (as distill.policy's
//                  method), then the fused target is distilled as in kd, in the same round;
//   central        the target trains on the union of every client's training text, with one
//                  Adam optimizer kept over the whole run and as many steps per round as all
//                  clients together (local_steps x clients) at the same batch size: the upper
//                  bound that federated learning tries to approach.
// Clients train concurrently (one LibTorch thread each); every result is a function of the
// experiment, the seed, the client and the round only, so outputs do not depend on threads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lab/corpus.h"
#include "lab/experiment.h"

namespace edgefuse::lab {

struct RoundResult {
  int round = 0;                            // 0: the initial model
  std::map<std::string, double> group_bpc;  // held-out bits per character per group
  double overall = 0.0;                     // mean over the groups
  std::vector<std::int64_t> bytes_up;       // per client (experiment order); 0 when it sat out
  std::vector<std::int64_t> bytes_down;
  double seconds = 0.0;  // wall time of the round (not in results.json)
};

struct MethodRun {
  Method method = Method::kFedRolex;
  std::uint64_t seed = 0;
  std::vector<RoundResult> rounds;  // rounds + 1 entries
};

// The held-out windows of each group (stride = context).
struct EvalSets {
  std::vector<std::string> groups;
  std::vector<Windows> windows;
};
EvalSets make_eval_sets(const Experiment& experiment, const Corpus& corpus);

// Runs one method for one seed in `work` (a folder it owns: the rounds' targets, updates,
// plans, signals and jobs), leaving the final target in work/final. `progress` receives a line
// per round.
MethodRun run_method(const Experiment& experiment, const Corpus& corpus, const EvalSets& eval,
                     Method method, std::uint64_t seed, const std::filesystem::path& work,
                     const std::function<void(const std::string&)>& progress);

}  // namespace edgefuse::lab
