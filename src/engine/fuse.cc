// The fusion engine (engine/fuse.h).
#include "edgefuse/engine/fuse.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <utility>

#include "edgefuse/aggregate/tile_memory.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/kernels/triad.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/federated.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"
#include "src/engine/client_registry.h"
#include "src/engine/input_identity.h"
#include "src/engine/job_files.h"
#include "src/engine/journal_notes.h"
#include "src/io/io_util.h"
#include "src/io/staged_file.h"
#include "src/lora/operands.h"
#include "src/plan/json_util.h"
#include "src/plan/load_schema.h"
#include "src/plan/slicing.h"

namespace edgefuse {

using detail::fail;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// Every file and folder the job reads; neither the output nor the report may be, contain or
// lie inside one of them (io/output_guard.h).
InputSet job_inputs(const FusionJob& job, const Checkpoint& target, const fs::path& target_folder) {
  InputSet inputs;
  if (!job.job_file.empty()) inputs.add(job.job_file, "the job file");
  inputs.add(job.target, "the target");
  inputs.add_checkpoint(target, "the target");
  inputs.add(target_folder / "config.json", "the target's config.json");
  if (job.model_config) inputs.add(*job.model_config, "the model config");
  if (!detail::is_preset_schema(job.schema)) inputs.add(job.schema, "the schema");
  for (const auto& c : job.clients) {
    inputs.add(c.path, (c.kind == FusionClient::Kind::kUpdate ? "the update of client '"
                                                              : "the adapter of client '") +
                           c.name + "'");
    if (c.plan) inputs.add(*c.plan, "the plan of client '" + c.name + "'");
  }
  return inputs;
}

// Memory model: one tile buffer per thread (a quarter of what the budget leaves after the
// writer's buffers, `fixed` bytes), the rest headroom for the clients' state. Returns the tile
// elements; throws Error when the budget cannot hold the smallest tiles.
std::size_t plan_tile_memory(std::uint64_t budget, std::uint64_t fixed, std::size_t threads) {
  const std::uint64_t per_thread_min = tile_bytes_per_element(false) * kMinTileElements;
  if (budget < fixed + threads * per_thread_min) {
    fail("memory budget of ", budget, " bytes is below the engine's minimum of ",
         fixed + threads * per_thread_min, " (", threads,
         " threads x 48 KiB tiles + 2 x 8 MiB writer buffers)");
  }
  return tile_elements_for((budget - fixed) / 4, threads, false);
}

// The resume identity: everything the output bytes depend on (not threads or budget).
std::string resume_identity(const FusionJob& job) {
  detail::InputIdentity identity;
  identity.add("target", fs::absolute(job.target).lexically_normal().string());
  identity.add("schema", job.schema);
  identity.add("mode", job.mode == AggregateMode::kDelta ? "delta" : "params");
  identity.add("server_lr", json(job.server_lr).dump());
  identity.add_file(job.target);
  if (job.model_config) identity.add_file(*job.model_config);
  if (!detail::is_preset_schema(job.schema)) identity.add_file(job.schema);
  {
    std::vector<std::string> clients;
    for (const auto& c : job.clients) {
      clients.push_back(json{c.name, c.kind == FusionClient::Kind::kUpdate ? "update" : "adapter",
                             fs::absolute(c.path).lexically_normal().string(),
                             c.plan ? fs::absolute(*c.plan).lexically_normal().string() : "",
                             c.weight}
                            .dump());
      identity.add_file(c.path);
      if (c.plan) identity.add_file(*c.plan);
    }
    std::sort(clients.begin(), clients.end());
    identity.add("clients", json(clients).dump());
  }
  return identity.text();
}

}  // namespace

FusionReport run_fusion(const FusionJob& job,
                        const std::function<void(const FusionProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const ScopedNumThreads threads_for_this_run(
      job.threads);  // the caller's count comes back on exit
  FusionReport rep;
  rep.output = job.output;
  if (job.report.empty()) {
    fs::path out = job.output.lexically_normal();
    if (!out.has_filename()) out = out.parent_path();  // "fused/" -> "fused"
    rep.report_file = out.string() + ".report.json";
  } else {
    rep.report_file = job.report;
  }
  rep.threads = num_threads();
  rep.memory_budget = job.memory_budget;

  const Checkpoint target = Checkpoint::open(job.target);
  const fs::path target_folder =
      fs::is_directory(job.target) ? job.target : job.target.parent_path();
  const InputSet inputs = job_inputs(job, target, target_folder);
  // The output first (the writer checks it again when it is made), then the report: not an
  // input, not the output nor inside it, and an existing file is replaced only when it is an
  // earlier report. Its temporary file is made now, so a report that cannot be written fails
  // the job before any work.
  const std::string replace_hint = "set \"replace\": true in the job";
  check_output_folder(job.output, inputs, job.replace, replace_hint);
  InputSet report_guard = inputs;
  report_guard.add(job.output, "the output");
  if (fs::absolute(rep.report_file).lexically_normal() ==
      fs::absolute(job.output).lexically_normal()) {
    fail(rep.report_file.string(), ": the report is the output; choose another path");
  }
  check_output_file(rep.report_file, report_guard, /*replace=*/true, "the report", "",
                    &is_fusion_report);
  detail::StagedFile report_file(rep.report_file);

  WriteOptions wo;
  wo.replace_existing = job.replace;
  wo.replace_hint = replace_hint;
  wo.inputs = inputs;
  FusionProgress prog;  // updated by the writer after each piece it writes
  if (progress) {
    wo.on_tensor_bytes = [&](std::string_view tensor, std::uint64_t bytes) {
      if (prog.tensor != tensor) {
        if (!prog.tensor.empty()) ++prog.tensors_done;
        prog.tensor = std::string(tensor);
      }
      prog.bytes_done += bytes;
      prog.seconds = seconds();
      progress(prog);
    };
  }
  const std::uint64_t fixed = 2 * static_cast<std::uint64_t>(wo.chunk_bytes);
  rep.tile_elements = plan_tile_memory(job.memory_budget, fixed, rep.threads);
  wo.resume_identity = resume_identity(job);
  std::map<std::string, TensorCoverage> resumed;  // coverage of tensors kept from a killed run
  wo.on_resumed = [&](std::string_view tensor, std::string_view note, std::uint64_t bytes) {
    resumed[std::string(tensor)] = detail::coverage_of_note(tensor, note);
    ++rep.resumed_tensors;
    rep.resumed_bytes += bytes;
    prog.bytes_done += bytes;
    ++prog.tensors_done;
  };
  const Aggregator* agg_for_notes = nullptr;  // set once the aggregator exists
  wo.journal_note = [&](std::string_view tensor) -> std::string {
    if (agg_for_notes == nullptr) return "";
    const ModelLayout& l = agg_for_notes->layout();
    const ModelLayout::Tensor* t = l.find(tensor);
    if (t == nullptr) return "";
    return detail::coverage_note(
        agg_for_notes->report()[static_cast<std::size_t>(t - l.tensors().data())]);
  };

  // The destination is checked (and locked) before any tensor is read.
  CheckpointWriter writer(job.output, wo);
  const ModelLayout layout =
      detail::load_schema(job.schema, &target, job.target, job.model_config.value_or(fs::path()),
                          "set \"model_config\"")
          .bind(tensor_metas(target));
  // A triad of 3 x 8 Mi floats (96 MiB), or less under a small budget.
  const std::size_t triad_n = static_cast<std::size_t>(
      std::min<std::uint64_t>(std::uint64_t{1} << 23, job.memory_budget / 4 / 12));
  rep.triad_bytes_per_second =
      measure_triad_if_memory_allows(std::max<std::size_t>(triad_n, 1 << 16), 3);

  AggregateOptions ao;
  ao.mode = job.mode;
  ao.server_lr = job.server_lr;
  ao.tile_elements = rep.tile_elements;
  Aggregator agg(layout, ao);
  agg_for_notes = &agg;

  detail::ClientRegistry clients(layout, agg);
  clients.register_all(job, fixed + rep.threads * rep.tile_elements * tile_bytes_per_element(false),
                       rep);
  if (rep.accepted.empty()) {
    std::string why =
        rep.rejected.empty() ? "" : rep.rejected.front().name + ": " + rep.rejected.front().reason;
    fail("no valid client contribution to fuse (", rep.rejected.size(), " rejected; first: ", why,
         "); the output was not written");
  }

  // Stream the fused tensors through the writer, reporting progress per piece.
  agg.finalize_to(writer, views_of(target));
  if (fs::exists(target_folder / "config.json")) {
    writer.add_file("config.json",
                    detail::read_config_file(target_folder / "config.json", detail::kMaxJobBytes));
  }
  rep.bytes_read += target.total_bytes();
  const std::uint64_t total = target.total_bytes();
  prog.tensors_total = layout.tensors().size();
  prog.bytes_total = total;
  // The report is made once every tensor is written and goes into the output folder, in the
  // same commit; its copy at rep.report_file is written and synced before the output is
  // published and moved into place right after it.
  writer.add_file(kReportInOutput, [&]() -> std::string {
    rep.bytes_read -= rep.resumed_bytes;  // resumed tensors' target rows were not read again
    rep.bytes_written = total - rep.resumed_bytes;
    rep.coverage = agg.report();
    for (auto& c : rep.coverage) {
      if (const auto it = resumed.find(c.name); it != resumed.end()) c = it->second;
    }
    rep.seconds = seconds();
    std::string text = fusion_report_json(rep);
    report_file.write(text);
    return text;
  });
  writer.commit();
  report_file.publish();
  if (progress) {
    prog.tensors_done = prog.tensors_total;
    prog.seconds = seconds();
    progress(prog);
  }
  return rep;
}

}  // namespace edgefuse
