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
// Job file (JSON; paths relative to the job file):
//   {"target": "target", "schema": "llama", "output": "fused",
//    "mode": "delta", "server_lr": 1.0, "memory_budget": "2GiB", "threads": 0,
//    "clients": [
//      {"name": "c0", "update": "c0.safetensors", "plan": "c0.plan.json", "weight": 120},
//      {"name": "c1", "adapter": "c1-lora", "plan": "c1.plan.json", "weight": 80}]}
// Optional keys: "model_config" (else config.json beside the target), "replace" (false),
// "report" (default "<output>.report.json"). A client's "name" defaults to its "update" or
// "adapter" path as the job writes it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"

namespace edgefuse {

struct FusionClient {
  enum class Kind : std::uint8_t { kUpdate, kAdapter };
  std::string name;  // unique in the job; the fusion order
  Kind kind = Kind::kUpdate;
  std::filesystem::path path;                 // update checkpoint, or PEFT adapter folder
  std::optional<std::filesystem::path> plan;  // required for updates; optional for adapters
  double weight = 1.0;
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
  std::uint64_t memory_budget = std::uint64_t{2} << 30;
  std::size_t threads = 0;  // 0: every core
  std::vector<FusionClient> clients;
};

// Reads and validates a job file. Throws Error naming the file and the key: unknown keys,
// wrong types, a missing required key, a client with both or neither of update/adapter, an
// update without a plan, a weight that is not a number, a budget that does not parse
// ("512MiB", "2GiB", "1.5GB" or a byte count).
FusionJob parse_fusion_job(const std::filesystem::path& job_file);

// Bytes from "2GiB", "512MiB", "1.5GB", "800M" or "123456". Throws Error.
std::uint64_t parse_byte_size(const std::string& text);

struct FusionProgress {
  std::size_t tensors_done = 0, tensors_total = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;  // output bytes
  double seconds = 0.0;
  std::string tensor;  // the tensor being written
};

struct RejectedClient {
  std::string name;
  std::string reason;
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
// Memory: the budget covers the writer's two 8 MiB buffers, one tile buffer per thread
// (12 bytes per element, at most 64 Ki elements) and the clients' state, counted as each is
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
