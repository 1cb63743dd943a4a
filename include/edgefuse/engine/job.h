// edgefuse/engine/job.h — a fusion job: the target, the clients' contributions and where the
// fused checkpoint goes, read from a job file.
//
// Job file (JSON; paths relative to the job file):
//   {"target": "target", "schema": "llama", "output": "fused",
//    "mode": "delta", "server_lr": 1.0, "memory_budget": "2GiB", "threads": 0,
//    "clients": [
//      {"name": "c0", "update": "c0.safetensors", "plan": "c0.plan.json", "weight": 120},
//      {"name": "c1", "adapter": "c1-lora", "plan": "c1.plan.json", "weight": 80}]}
// Optional keys: "model_config" (else config.json beside the target), "replace" (false),
// "report" (default "<output>.report.json"), "server_optimizer" (below; not with "server_lr"),
// "aggregation": "mean" (the default, weighted), "median", "trimmed_mean" or
// {"rule": "trimmed_mean", "beta": 0.2} (aggregate/options.h RobustAggregate; unweighted;
// {"rule": "median", "weighted": true} is the client-weighted median), or a
// client selection (aggregate/selection.h): {"rule": "krum", "f": 0}, {"rule": "multi_krum",
// "f": 0, "m": 1} (the selected fused by the weighted mean) or {"rule": "bulyan", "f": 0}, or
// centered clipping (aggregate/centered_clip.h; delta mode): {"rule": "centered_clip", "tau":
// 0.5, "iterations": 1} (tau required), or
// a full-model task merge with mergekit's semantics (aggregate/options.h TaskMergeAggregate):
// {"rule": "ties", "density": 1, "majority_sign": "sum", "normalize": true, "rescale": false},
// {"rule": "dare_ties", ..., "seed": 0} or {"rule": "dare_linear", ..., "seed": 0} (no
// majority_sign; normalize off and rescale on by default; the seed is required below density 1).
// "clip" (below; delta mode only) clips the clients' updates, with DP-FedAvg's noise.
// A client's "name" defaults to its "update" or "adapter" path as the job writes it.
//
// "server_optimizer": a server optimizer's step on the round's pseudo-gradient instead of the
// plain mean (kernels/server_step.h), its state read from the previous round and written
// beside the new model:
//   {"rule": "fedadam", "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001,
//    "bias_correction": false, "state": "round3", "resume_state": true}
// Keys by rule, with their defaults:
//   fedavgm                       lr 1.0, momentum 0.9
//   nesterov                      lr 0.7, momentum 0.9 (the DiLoCo outer step)
//   fedadam, fedyogi, fedadagrad  lr 0.1 (fedyogi 0.01), beta1 0.9, beta2 0.99, tau 0.001;
//                                 fedadam also "bias_correction" (false)
// and for every rule "state" (the folder holding the previous state; default the target's
// folder) and "resume_state" (true: the state must be there; false: start from zeros, as in
// the first round). The new state goes into the output folder (engine/fuse.h).
//
// "clip": norm clipping of each client's whole update, and DP-FedAvg's Gaussian noise
// (aggregate/clipping.h):
//   {"norm": 1.0}                                   fixed clipping to C
//   {"adaptive": {"initial": 0.1, "quantile": 0.5, "lr": 0.2, "count_noise": 0.0}}
// with optional "noise_multiplier" (z, default 0), "seed" (required when z or count_noise is
// above 0), "state" and "resume_state" (as for "server_optimizer"). The clip state
// (edgefuse_clip_state.json: the round count and the next round's norm) is written into the
// output folder and read from the state folder: the round number keys the noise, and adaptive
// clipping takes its norm from there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "edgefuse/aggregate/options.h"
#include "edgefuse/aggregate/selection.h"

namespace edgefuse {

struct FusionClient {
  enum class Kind : std::uint8_t { kUpdate, kAdapter };
  std::string name;  // unique in the job; the fusion order
  Kind kind = Kind::kUpdate;
  std::filesystem::path path;                 // update checkpoint, or PEFT adapter folder
  std::optional<std::filesystem::path> plan;  // required for updates; optional for adapters
  double weight = 1.0;
};

struct ServerOptimizerJob {
  ServerStep step;               // rule and parameters; step.delta follows the job's mode
  bool bias_correction = false;  // fedadam: Flower's per-round lr factor
  std::optional<std::filesystem::path> state;  // the previous state's folder; empty: the target's
  bool resume_state = true;
};

// The job's "aggregation": a coordinate-wise rule, a client selection, centered clipping or a
// full-model task merge (none: the weighted mean).
struct AggregationJob {
  std::optional<RobustAggregate> robust;
  std::optional<ClientSelection> selection;
  std::optional<TaskMergeAggregate> task_merge;
  std::optional<CenteredClipOptions> centered_clip;
};

// The job's "clip".
struct ClipJob {
  bool adaptive = false;
  double norm = 0.0;                // fixed: C; adaptive: the first round's C ("initial")
  double quantile = 0.5, lr = 0.2;  // adaptive: the target unclipped fraction, its step
  double count_noise = 0.0;         // adaptive: std. dev. of the noise on the unclipped count
  double noise_multiplier = 0.0;
  std::optional<std::uint64_t> seed;
  std::filesystem::path state;  // empty: the target's folder
  bool resume_state = true;
};

struct FusionJob {
  std::filesystem::path job_file;  // for messages ("" when built in code)
  std::filesystem::path target;
  std::string schema;  // "llama", "gpt2", "mlp" or a schema file path
  std::optional<std::filesystem::path> model_config;
  std::filesystem::path output;
  std::filesystem::path report;  // empty: <output>.report.json
  bool replace = false;
  AggregateMode mode = AggregateMode::kDelta;
  float server_lr = 1.0f;
  std::optional<ServerOptimizerJob> server_optimizer;
  AggregationJob aggregation;
  std::optional<ClipJob> clip;
  std::uint64_t memory_budget = std::uint64_t{2} << 30;
  std::size_t threads = 0;  // 0: every core
  std::vector<FusionClient> clients;
};

// Reads and validates a job file. Throws Error naming the file and the key: unknown keys,
// wrong types, a missing required key, a client with both or neither of update/adapter, an
// update without a plan, a weight that is not a number, a budget that does not parse
// ("512MiB", "2GiB", "1.5GB" or a byte count), an unknown server rule, a key the rule does not
// take, a parameter outside its range (lr > 0, momentum and betas in [0, 1), tau > 0, all
// finite), "server_lr" together with "server_optimizer".
FusionJob parse_fusion_job(const std::filesystem::path& job_file);

// Bytes from "2GiB", "512MiB", "1.5GB", "800M" or "123456". Throws Error.
std::uint64_t parse_byte_size(const std::string& text);

}  // namespace edgefuse
