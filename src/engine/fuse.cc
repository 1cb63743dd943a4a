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

#include "edgefuse/aggregate/server_state.h"
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
#include "src/engine/clip_state_files.h"
#include "src/engine/server_state_files.h"
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
// writer's buffers and the pieces' state rows, `fixed` bytes), the rest headroom for the clients'
// state. Returns the tile elements; throws Error when the budget cannot hold the smallest tiles.
std::size_t plan_tile_memory(std::uint64_t budget, std::uint64_t fixed, std::size_t threads) {
  const std::uint64_t per_thread_min = tile_bytes_per_element(false) * kMinTileElements;
  if (budget < fixed + threads * per_thread_min) {
    fail("memory budget of ", budget, " bytes is below the engine's minimum of ",
         fixed + threads * per_thread_min, " (", threads, " threads x 48 KiB tiles + ", fixed >> 20,
         " MiB of writer buffers)");
  }
  return tile_elements_for((budget - fixed) / 4, threads, false);
}

// The resume identity: everything the output bytes depend on (not threads or budget).
std::string resume_identity(const FusionJob& job, const detail::PreviousServerState* state,
                            const std::optional<ClipReport>& clip) {
  detail::InputIdentity identity;
  identity.add("target", fs::absolute(job.target).lexically_normal().string());
  identity.add("schema", job.schema);
  identity.add("mode", job.mode == AggregateMode::kDelta ? "delta" : "params");
  identity.add("server_lr", json(job.server_lr).dump());
  if (const auto& r = job.aggregation.robust) {
    identity.add("aggregation", json{static_cast<int>(r->rule), r->beta, r->weighted}.dump());
  }
  if (const auto& s = job.aggregation.selection) {
    identity.add("selection", json{static_cast<int>(s->rule), s->f, s->m}.dump());
  }
  if (const auto& c = job.aggregation.centered_clip) {
    identity.add("centered_clip", json{c->tau, c->iterations}.dump());
  }
  if (const auto& t = job.aggregation.task_merge) {
    const TaskMergeOptions& o = t->options;
    identity.add(
        "task_merge",
        json{task_merge_method_name(t->method), o.density, static_cast<int>(o.majority_sign),
             o.normalize ? int(*o.normalize) : -1, o.rescale ? int(*o.rescale) : -1, o.seed}
            .dump());
  }
  if (job.clip) {
    const ClipJob& c = *job.clip;
    identity.add("clip", json{c.adaptive, c.quantile, c.lr, c.count_noise, c.noise_multiplier,
                              c.seed.value_or(0), clip->norm, clip->round}
                             .dump());
  }
  if (job.server_optimizer) {
    const ServerOptimizerJob& o = *job.server_optimizer;
    identity.add("server_optimizer",
                 json{server_rule_name(o.step.rule), o.step.lr, o.step.momentum, o.step.beta1,
                      o.step.beta2, o.step.tau, o.bias_correction, o.resume_state, state->steps}
                     .dump());
    if (state->checkpoint) {
      for (const auto& shard : state->checkpoint->shards()) identity.add_file(shard.path());
    }
  }
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

// The step of the round that takes the state's `step`-th step: with bias correction (fedadam),
// Flower's lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) with its server round t = step.
ServerStep server_step_of_round(const ServerOptimizerJob& o, std::uint64_t step) {
  ServerStep s = o.step;
  if (o.bias_correction) {
    const double t = static_cast<double>(step) + 1.0;
    s.lr = static_cast<float>(static_cast<double>(o.step.lr) *
                              std::sqrt(1.0 - std::pow(static_cast<double>(o.step.beta2), t)) /
                              (1.0 - std::pow(static_cast<double>(o.step.beta1), t)));
  }
  return s;
}

ServerOptimizerReport server_optimizer_report(const ServerOptimizerJob& o, const ServerStep& step,
                                              const detail::PreviousServerState& state,
                                              const ModelLayout& layout) {
  ServerOptimizerReport r;
  r.rule = server_rule_name(o.step.rule);
  r.lr = o.step.lr;
  r.lr_applied = step.lr;
  r.step = state.steps + 1;
  if (state.checkpoint) r.state_from = state.checkpoint->path();
  const std::uint64_t per_element = server_rule_has_v(o.step.rule) ? 8 : 4;
  for (const auto& t : layout.tensors()) {
    if (!detail::is_aggregatable(t.meta.dtype)) continue;
    r.state_tensors += server_rule_has_v(o.step.rule) ? 2 : 1;
    r.state_bytes += per_element * t.meta.shape.numel();
  }
  return r;
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
  // The previous server state, checked against the target before anything is written.
  std::optional<detail::PreviousServerState> state;
  if (job.server_optimizer) {
    state = detail::open_previous_server_state(*job.server_optimizer, target, target_folder);
  }
  std::optional<detail::PreviousClipState> clip_state;
  if (job.clip) {
    clip_state = detail::read_previous_clip_state(*job.clip, target_folder, target);
    rep.clip = detail::start_clip_report(*job.clip, clip_state);
  }
  InputSet inputs = job_inputs(job, target, target_folder);
  if (state && state->checkpoint) inputs.add_checkpoint(*state->checkpoint, "the server state");
  if (clip_state) inputs.add(clip_state->file, "the clip state");
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
  // The writer's two buffers, and with a server optimizer each piece's m and v rows (up to
  // 2 x 4 bytes per element of a piece of 2-byte elements).
  // A client selection's statistics pass and a task merge's passes run before the tiles and
  // hold their own buffers.
  const std::uint64_t fixed =
      (state ? 6 : 2) * static_cast<std::uint64_t>(wo.chunk_bytes) +
      (job.aggregation.selection || job.aggregation.centered_clip || job.clip
           ? client_statistics_bytes(job.clients.size(), rep.threads)
           : 0) +
      (job.aggregation.task_merge ? task_merge_pass_bytes(rep.threads) : 0);
  rep.tile_elements = plan_tile_memory(job.memory_budget, fixed, rep.threads);
  wo.resume_identity = resume_identity(job, state ? &*state : nullptr, rep.clip);
  std::string state_id;
  if (state) {
    state_id = detail::server_state_id(job, target, *state);
    wo.metadata[detail::kServerStateIdKey] = state_id;
  }
  std::string clip_id;
  if (rep.clip) {
    clip_id = detail::clip_state_id(job, target, *rep.clip);
    wo.metadata[detail::kClipStateIdKey] = clip_id;
  }
  std::map<std::string, TensorCoverage> resumed;  // coverage of tensors kept from a killed run
  std::uint64_t resumed_reads = 0;  // input bytes the kept tensors needed (not read again)
  wo.on_resumed = [&](std::string_view tensor, std::string_view note, std::uint64_t bytes) {
    ++rep.resumed_tensors;
    rep.resumed_bytes += bytes;
    if (target.find(tensor) == nullptr) {  // a server-state tensor, outside the progress count
      if (state->checkpoint) resumed_reads += bytes;
      return;
    }
    resumed_reads += bytes;
    resumed[std::string(tensor)] = detail::coverage_of_note(tensor, note);
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
  ao.robust = job.aggregation.robust;
  ao.selection = job.aggregation.selection;
  ao.task_merge = job.aggregation.task_merge;
  ao.centered_clip = job.aggregation.centered_clip;
  if (const auto& c = rep.clip) {
    ao.clip = ClipOptions{c->norm, c->noise_multiplier, job.clip->seed.value_or(0), c->round};
  }
  rep.aggregation = job.aggregation;
  NamedViews previous_state;
  if (state) {
    ao.server = server_step_of_round(*job.server_optimizer, state->steps + 1);
    if (state->checkpoint) {
      previous_state = views_of(*state->checkpoint);
      bind_server_state(
          layout, ao.server->rule, previous_state,
          "server_optimizer: the previous state '" + state->checkpoint->path().string() + "'");
    }
    rep.server_optimizer =
        server_optimizer_report(*job.server_optimizer, *ao.server, *state, layout);
  }
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

  // Stream the fused tensors (and the new state) through the writer, reporting progress per
  // piece.
  std::uint64_t total = target.total_bytes();
  if (state) {
    writer.add_group(
        detail::kServerStateStem,
        detail::server_state_metadata(*job.server_optimizer, state_id, state->steps + 1));
    agg.finalize_to(writer, views_of(target), previous_state, detail::kServerStateStem);
    total += rep.server_optimizer->state_bytes;
    if (state->checkpoint) rep.bytes_read += state->checkpoint->total_bytes();
  } else {
    agg.finalize_to(writer, views_of(target));
  }
  std::map<std::string, std::string> names;  // the aggregator's labels are the clients' paths
  for (const auto& fc : job.clients) names[fc.path.string()] = fc.name;
  const auto name_of = [&](const std::string& label) { return names[label]; };
  if (const ClipResult* c = agg.clipping()) {  // known once the round is declared
    for (const auto& label : c->labels) rep.clip->clients.push_back(name_of(label));
    rep.clip->norms = c->norms;
    rep.clip->factors = c->factors;
    rep.clip->unclipped = c->unclipped;
    detail::finish_clip_report(*job.clip, *rep.clip);
    writer.add_file(detail::kClipStateFile, detail::clip_state_json(*rep.clip, clip_id));
  }
  if (fs::exists(target_folder / "config.json")) {
    writer.add_file("config.json",
                    detail::read_config_file(target_folder / "config.json", detail::kMaxJobBytes));
  }
  rep.bytes_read += target.total_bytes();
  prog.tensors_total = layout.tensors().size();
  prog.bytes_total = target.total_bytes();
  // The report is made once every tensor is written and goes into the output folder, in the
  // same commit; its copy at rep.report_file is written and synced before the output is
  // published and moved into place right after it.
  writer.add_file(kReportInOutput, [&]() -> std::string {
    rep.bytes_read -= resumed_reads;
    rep.bytes_written = total - rep.resumed_bytes;
    rep.coverage = agg.report();
    if (const SelectionResult* s = agg.selection()) {
      ClientSelectionReport& out = rep.selection.emplace();
      for (const auto& label : agg.statistics()->labels) out.clients.push_back(name_of(label));
      out.scores = s->scores;
      out.selected.assign(out.clients.size(), false);
      for (const std::size_t k : s->selected) out.selected[k] = true;
    }
    if (const CenteredClipResult* c = agg.centered_clipping()) {
      rep.centered_clip = *c;
      for (auto& label : rep.centered_clip->labels) label = name_of(label);
    }
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
