// edgefuse/engine/fuse.h — one fusion round as a job: a target checkpoint, a list of client
// contributions of any kind, and a fused checkpoint written tile by tile within a memory budget.
//
// The engine is the program around the operators. It:
//   - opens the target lazily (mmap) and binds its schema;
//   - registers every client contribution:
//       * sub-model updates with their plans (aggregate/aggregator.h, HeteroFL / FedRolex / FjORD
//         coverage rule);
//       * PEFT LoRA adapters, optionally trained on a sub-model and lifted through its plan
//         (as lora/federated.h lift_adapter does). They join the same coverage mean as
//         low-rank deltas on the rows and columns they cover (delta mode), their factors
//         read per tensor from the mapped adapter files;
//   - rejects an invalid, non-finite, mis-shaped, duplicated or badly weighted contribution
//     with its reason, and fuses the others;
//   - streams every target tensor through the atomic checkpoint writer. Each tile of rows
//     visits only the contributions that touch it, accumulates in fp32 and rounds once;
//   - reports time, bytes, GB/s against a STREAM triad measured at start, per-tensor coverage
//     and the rejected clients.
//
// What it never touches: the output and the report may not be, contain or lie inside any
// file or folder the job reads (target, updates, adapters, plans, job file, schema, model
// config; compared by device and inode); an existing output is replaced only with "replace"
// and only when it is a checkpoint folder, an existing report only when it is an earlier
// report. The report is written into the output folder (kReportInOutput) in the same commit
// as the tensors, and its copy at "report" is written and synced before the output is
// published, then moved into place: a report that cannot be written fails the job with
// nothing published.
//
// Output bits do not depend on the thread count, the tile size (memory budget) or the order of
// the clients in the job: clients are fused in the order of their names.
//
// Resume: the output is written resumably (io/checkpoint.h WriteOptions::resume_identity). A
// run killed at any instant leaves a staging folder beside the output with a journal of the
// tensors already durable; the same job started again (any thread count or budget) keeps
// them and produces only the rest, and the output bytes equal an uninterrupted run's. The
// identity is the job's content plus the size and modification time of every input file, so
// a changed input starts afresh.
//
//
// Server optimizer (job key "server_optimizer"): the new state is written into the output folder
// as the file group "server_state", committed with the model, and the previous state is read
// from the folder the job names (default: the target's). The model's and the state's shards
// carry one id, so a state is only stepped beside the model it was written with.
//
// The job is described in engine/job.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/engine/job.h"

namespace edgefuse {

struct FusionProgress {
  std::size_t tensors_done = 0, tensors_total = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;  // output bytes
  double seconds = 0.0;
  std::string tensor;  // the tensor being written
};

// Why a client was rejected, by the step that refused it (in this order):
//   kDuplicateName: another client has its name;
//   kWeight:        its weight is outside [1e-12, 1e12] (or not a finite number);
//   kUnreadable:    its update or adapter cannot be opened as a checkpoint or PEFT folder;
//   kDuplicateFile: it names the same file as an earlier client (device and inode);
//   kBadPlan:       its plan file is missing, is not a valid plan, or does not fit the target;
//   kBadUpdate:     its update or adapter does not match its plan (tensors, shapes, dtypes,
//                   modules) or holds a NaN or Inf value.
enum class RejectionKind : std::uint8_t {
  kDuplicateName,
  kWeight,
  kUnreadable,
  kDuplicateFile,
  kBadPlan,
  kBadUpdate
};
// "duplicate_name", "weight", "unreadable", "duplicate_file", "bad_plan", "bad_update": the
// report's "kind".
const char* rejection_kind_name(RejectionKind kind) noexcept;

struct RejectedClient {
  std::string name;
  RejectionKind kind;
  std::string reason;  // the error message, naming the file, tensor or value
};

// Clipping (job key "clip"): the round's norm C and the next round's (adaptive clipping moves
// it; fixed keeps it), the round number that keyed the noise (1 in the first round), the
// fraction of clients left unclipped that moved C (noised with "count_noise"), where the
// previous state came from (empty: the first round), and each accepted client's update norm
// and factor min(1, C / norm), in fusion order.
struct ClipReport {
  std::string rule;  // "fixed" or "adaptive"
  double norm = 0.0, next_norm = 0.0;
  std::uint64_t round = 0;
  double noise_multiplier = 0.0;
  std::size_t unclipped = 0;
  double unclipped_fraction = 0.0;
  std::filesystem::path state_from;
  std::vector<std::string> clients;
  std::vector<double> norms;
  std::vector<float> factors;
};

// The server optimizer's step (job key "server_optimizer"): its rule, the lr of the job and the
// one applied (after bias correction), the step count the new state has reached (1 in the first
// round), where the previous state came from (empty: zeros) and the state written.
struct ServerOptimizerReport {
  std::string rule;
  double lr = 0.0, lr_applied = 0.0;
  std::uint64_t step = 0;
  std::filesystem::path state_from;
  std::size_t state_tensors = 0;
  std::uint64_t state_bytes = 0;
};

// A client selection's outcome (job key "aggregation" with krum, multi_krum or bulyan): each
// accepted client's Krum score (aggregate/selection.h; +inf: it shares no element with enough
// others) and whether it was fused, in the order the clients were accepted.
struct ClientSelectionReport {
  std::vector<std::string> clients;
  std::vector<double> scores;
  std::vector<bool> selected;
};

struct FusionReport {
  std::filesystem::path output, report_file;
  double seconds = 0.0;
  std::uint64_t bytes_read = 0, bytes_written = 0;  // this run's (resumed tensors excluded)
  double triad_bytes_per_second = 0.0;
  std::size_t threads = 0;
  std::size_t tile_elements = 0;
  std::uint64_t memory_budget = 0;
  // What the registered clients keep in memory, counted against the budget (Aggregator::
  // resident_bytes plus the updates' and adapters' file indexes).
  std::uint64_t client_state_bytes = 0;
  std::vector<std::string> accepted;
  std::vector<RejectedClient> rejected;
  std::vector<TensorCoverage> coverage;
  std::optional<ServerOptimizerReport> server_optimizer;
  AggregationJob aggregation;
  std::optional<ClientSelectionReport> selection;
  // With "centered_clip": each accepted client's coefficient, distance and factor, labels
  // replaced by the clients' names.
  std::optional<CenteredClipResult> centered_clip;
  std::optional<ClipReport> clip;
  // Tensors (and their bytes) kept from an earlier, killed run of the same job.
  std::size_t resumed_tensors = 0;
  std::uint64_t resumed_bytes = 0;
  double bytes_per_second() const noexcept {
    return seconds > 0 ? static_cast<double>(bytes_read + bytes_written) / seconds : 0.0;
  }
  double triad_fraction() const noexcept {
    return triad_bytes_per_second > 0 ? bytes_per_second() / triad_bytes_per_second : 0.0;
  }
};

// Runs the job. Rejected clients are reported, not fatal; zero accepted clients, a target that
// cannot be read, a budget too small for one tile or for the clients' state, or an output that
// exists without "replace" are errors (Error or CheckpointError), and then the output is
// untouched.
//
// Memory: the budget covers the writer's two 8 MiB buffers (six with a server optimizer: a
// piece's state rows), one tile buffer per thread
// (aggregate/tile_memory.h) and the clients' state, counted as each is
// registered: plans and their index lists, the updates' and adapters' tensor indexes, and the
// most that one tensor's per-client state reaches while it is computed (row and run lists,
// adapter factors, which are read from the adapter files per tensor and dropped after it).
// Client values are read through mmap and not held. A round whose state would exceed the
// budget fails before anything is written, naming the client at which it did. The report is also
// written as JSON to job.report (or <output>.report.json).
FusionReport run_fusion(const FusionJob& job,
                        const std::function<void(const FusionProgress&)>& progress = {});

// The report as JSON text (what run_fusion writes).
std::string fusion_report_json(const FusionReport& report);

// The name of the report's copy inside the output folder, committed with the tensors.
inline constexpr const char* kReportInOutput = "fusion_report.json";

// Whether `path` holds a report run_fusion wrote (the only file a report may replace).
bool is_fusion_report(const std::filesystem::path& path);

}  // namespace edgefuse
