// The fusion engine (engine/fuse.h).
#include "edgefuse/engine/fuse.h"

#include <fcntl.h>

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
#include "src/core/parse_number.h"
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

constexpr std::uint64_t kMaxJobBytes = 64u << 20;
// Weights are sample counts or fractions. Outside [kMinWeight, kMaxWeight] a weight is
// refused: the sum of weights must stay finite and meaningful in f32, and a smaller weight
// would round to 0 or to a subnormal there and contribute nothing.
constexpr double kMinWeight = 1e-12;
constexpr double kMaxWeight = 1e12;

bool is_preset(const std::string& schema) {
  return schema == "llama" || schema == "gpt2" || schema == "mlp";
}

std::string read_text(const fs::path& p) {
  return detail::read_small_file(p, kMaxJobBytes, CheckpointRule::kInvalidArgument);
}

// A PEFT adapter client, read through mmap: each module's factors are converted, checked and
// cut to the rows and columns its plan covers only when the aggregator asks for that tensor
// (once to check them at registration, once when the tensor is computed), so a round holds
// one tensor's factors of every adapter, not whole adapters.
class AdapterClient {
 public:
  AdapterClient(const fs::path& folder, const ModelLayout& layout, const std::optional<Plan>& plan)
      : layout_(layout), peft_(PeftAdapter::open(folder)), label_("adapter '" + folder.string() + "'") {
    detail::reject_unmergeable(peft_, folder.string(), /*allow_dora=*/false);  // DoRA is not a delta
    std::map<std::string, std::size_t> by_local;  // client-local weight name -> layout index
    if (plan) {
      validate_plan(*plan, layout, folder.string() + ": plan");
      lists_ = std::make_unique<detail::PlanLists>(layout, *plan);
      for (std::size_t i = 0; i < layout.tensors().size(); ++i) {
        std::string local = detail::local_name_of(layout, layout.tensors()[i], *lists_);
        if (!local.empty()) by_local.emplace(std::move(local), i);
      }
    }
    for (std::size_t p = 0; p < peft_.pairs().size(); ++p) {
      const LoraPair& pair = peft_.pairs()[p];
      const bool transposed = pair.kind == LoraPair::Kind::kEmbedding || peft_.config().fan_in_fan_out;
      const Shape want = transposed ? Shape{pair.in_features, pair.out_features}
                                    : Shape{pair.out_features, pair.in_features};
      std::size_t ti = 0;
      Shape have;
      detail::Slice slice;
      if (lists_) {
        const auto it = by_local.find(pair.base_weight);
        if (it == by_local.end()) {
          fail(label_, ": module '", pair.module, "' targets '", pair.base_weight,
               "', which the plan's sub-model does not have");
        }
        ti = it->second;
        slice = detail::slice_of(layout, layout.tensors()[ti], *lists_, true);
        have = slice.local_shape;
      } else {
        const ModelLayout::Tensor* t = layout.find(pair.base_weight);
        if (t == nullptr) {
          fail("module '", pair.module, "' targets '", pair.base_weight, "', which the target lacks");
        }
        ti = static_cast<std::size_t>(t - layout.tensors().data());
        have = t->meta.shape;
      }
      if (have != want) {
        fail("module '", pair.module, "' needs a weight of ", want.to_string(), " but '",
             pair.base_weight, "' is ", have.to_string());
      }
      // A module whose rows or columns the plan's aggregate_only masks out entirely adds nothing.
      if (lists_) {
        const auto kept = [&](int d) {
          return std::count(slice.keep[d].begin(), slice.keep[d].end(), true) > 0;
        };
        if (!kept(0) || !kept(1)) continue;
      }
      const std::string& name = layout.tensors()[ti].meta.name;
      if (!pair_of_.emplace(name, p).second) {
        fail("modules of '", name, "' given twice");
      }
      tensors_.push_back(name);
    }
  }
  const std::vector<std::string>& tensors() const noexcept { return tensors_; }
  // Bytes held until the round ends: the adapter's tensor index, the plan's lists, the map.
  std::uint64_t bytes() const {
    std::uint64_t b = sizeof(*this) + 160 * (peft_.pairs().size() + tensors_.size());
    for (const auto& e : peft_.checkpoint().tensors()) b += sizeof(e) + sizeof(*e.info) + e.info->name.size();
    if (lists_) {
      for (const auto& list : lists_->axis) b += 24 + 4 * list.size();
      b += 8 * lists_->local_layer.size();
    }
    return b;
  }

  LowRankDelta make(const std::string& tensor) const {
    const LoraPair& p = peft_.pairs()[pair_of_.at(tensor)];
    const LoraModule m = make_lora_module(p.module, peft_.a(p), peft_.b(p), p.scaling, label_,
                                          p.kind, peft_.config().fan_in_fan_out);
    const auto op = detail::lora_operands(m);
    LowRankDelta d;
    d.tensor = tensor;
    d.rank = static_cast<std::size_t>(op->rank);
    d.scale = static_cast<float>(m.scaling);
    const float* l = op->l.view().data_as<float>();
    const float* r = op->r.view().data_as<float>();
    if (!lists_) {
      d.l.assign(l, l + op->l.numel());
      d.r.assign(r, r + op->r.numel());
      return d;
    }
    // Covered (target, local) rows and columns in target order; L and R cut to them.
    const auto& t = *layout_.find(tensor);
    const detail::Slice s = detail::slice_of(layout_, t, *lists_, true);
    std::vector<std::pair<std::uint32_t, std::uint32_t>> at[2];
    for (int dim = 0; dim < 2; ++dim) {
      for (std::size_t i = 0; i < s.elems[dim].size(); ++i) {
        if (s.keep[dim][i]) at[dim].push_back({s.elems[dim][i], static_cast<std::uint32_t>(i)});
      }
      std::sort(at[dim].begin(), at[dim].end());
    }
    const std::size_t rank = d.rank, cols = static_cast<std::size_t>(op->cols);
    for (const auto& [target, local] : at[0]) {
      d.rows.push_back(target);
      d.l.insert(d.l.end(), l + std::size_t{local} * rank, l + (std::size_t{local} + 1) * rank);
    }
    d.r.resize(rank * at[1].size());
    for (std::size_t j = 0; j < at[1].size(); ++j) {
      d.cols.push_back(at[1][j].first);
      for (std::size_t k = 0; k < rank; ++k) d.r[k * at[1].size() + j] = r[k * cols + at[1][j].second];
    }
    return d;
  }

 private:
  const ModelLayout& layout_;
  PeftAdapter peft_;
  std::string label_;
  std::unique_ptr<detail::PlanLists> lists_;
  std::map<std::string, std::size_t> pair_of_;  // target tensor -> pair index
  std::vector<std::string> tensors_;
};

std::uint64_t folder_bytes(const fs::path& p) {
  std::error_code ec;
  if (fs::is_regular_file(p, ec)) return fs::file_size(p, ec);
  std::uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(p, ec)) {
    if (e.is_regular_file(ec)) n += e.file_size(ec);
  }
  return n;
}

// What the fused bytes depend on, for the resume journal: the job's content and the size and
// modification time of every input file (folders: each regular file in them).
class InputIdentity {
 public:
  void add(const std::string& key, const std::string& value) { j_[key] = value; }
  void add_file(const fs::path& p) {
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> files;
      for (const auto& e : fs::directory_iterator(p, ec)) {
        if (e.is_regular_file(ec)) files.push_back(e.path());
      }
      std::sort(files.begin(), files.end());
      for (const auto& f : files) add_file(f);
      return;
    }
    const auto size = fs::file_size(p, ec);
    const auto mtime = fs::last_write_time(p, ec).time_since_epoch().count();
    j_["files"].push_back({fs::absolute(p).lexically_normal().string(), ec ? 0 : size,
                           static_cast<std::int64_t>(mtime)});
  }
  std::string text() const { return j_.dump(); }

 private:
  json j_ = json::object();
};

// A tensor's coverage as the note of its journal line, and back.
std::string coverage_note(const TensorCoverage& c) {
  return json{c.elements, c.covered, c.min_contributors, c.max_contributors}.dump();
}
TensorCoverage coverage_of_note(std::string_view name, std::string_view note) {
  TensorCoverage c;
  c.name = std::string(name);
  const json j = json::parse(note, nullptr, false);
  if (j.is_array() && j.size() == 4) {
    c.elements = j[0].get<std::uint64_t>();
    c.covered = j[1].get<std::uint64_t>();
    c.min_contributors = j[2].get<std::uint32_t>();
    c.max_contributors = j[3].get<std::uint32_t>();
  }
  return c;
}

}  // namespace

std::uint64_t parse_byte_size(const std::string& text) {
  double v = 0;
  const std::size_t used = detail::parse_double_prefix(text, &v);
  if (used == 0 || !(v >= 0) || !std::isfinite(v)) {
    fail("memory size '", text, "' is not a number of bytes (e.g. 2GiB, 512MiB, 1.5GB)");
  }
  std::string unit = text.substr(used);
  unit.erase(0, unit.find_first_not_of(' '));
  static const std::map<std::string, double> units{
      {"", 1},           {"B", 1},          {"K", 1e3},        {"KB", 1e3},
      {"M", 1e6},        {"MB", 1e6},       {"G", 1e9},        {"GB", 1e9},
      {"T", 1e12},       {"TB", 1e12},      {"KiB", 1024.0},   {"MiB", 1048576.0},
      {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  const auto it = units.find(unit);
  if (it == units.end()) fail("memory size '", text, "': unknown unit '", unit, "'");
  const double bytes = v * it->second;
  if (bytes > 1.8e19) fail("memory size '", text, "' is too large");
  return static_cast<std::uint64_t>(bytes);
}

FusionJob parse_fusion_job(const fs::path& job_file) {
  const std::string label = job_file.string();
  const json j = detail::parse_config_json(read_text(job_file), label);
  if (!j.is_object()) fail(label, ": a job must be a JSON object");
  const fs::path base = job_file.parent_path();
  auto path_of = [&](const json& v, const std::string& what) -> fs::path {
    if (!v.is_string() || v.get<std::string>().empty()) {
      fail(label, ": \"", what, "\" must be a non-empty path string");
    }
    const fs::path p = v.get<std::string>();
    return p.is_absolute() ? p : base / p;
  };
  static const std::set<std::string> known{"target", "schema", "model_config", "output", "report",
                                           "replace", "mode", "server_lr", "memory_budget",
                                           "threads", "clients"};
  for (const auto& [k, v] : j.items()) {
    if (!known.count(k)) {
      fail(label, ": unknown key '", k, "' (expected target, schema, model_config, output, report, "
                  "replace, mode, server_lr, memory_budget, threads, clients)");
    }
  }
  for (const char* k : {"target", "schema", "output", "clients"}) {
    if (!j.contains(k)) fail(label, ": \"", k, "\" is required");
  }
  FusionJob job;
  job.job_file = job_file;
  job.target = path_of(j.at("target"), "target");
  if (!j.at("schema").is_string() || j.at("schema").get<std::string>().empty()) {
    fail(label, ": \"schema\" must be \"llama\", \"gpt2\", \"mlp\" or a schema file");
  }
  job.schema = j.at("schema").get<std::string>();
  if (job.schema != "llama" && job.schema != "gpt2" && job.schema != "mlp") {
    job.schema = path_of(j.at("schema"), "schema").string();
  }
  if (j.contains("model_config")) job.model_config = path_of(j.at("model_config"), "model_config");
  job.output = path_of(j.at("output"), "output");
  if (j.contains("report")) job.report = path_of(j.at("report"), "report");
  if (j.contains("replace")) {
    if (!j.at("replace").is_boolean()) fail(label, ": \"replace\" must be true or false");
    job.replace = j.at("replace").get<bool>();
  }
  if (j.contains("mode")) {
    const json& m = j.at("mode");
    if (m == "params") {
      job.mode = AggregateMode::kParams;
    } else if (m == "delta") {
      job.mode = AggregateMode::kDelta;
    } else {
      fail(label, ": \"mode\" must be \"params\" or \"delta\", got ", m.dump());
    }
  }
  if (j.contains("server_lr")) {
    const json& lr = j.at("server_lr");
    if (!lr.is_number() || !std::isfinite(lr.get<double>())) {
      fail(label, ": \"server_lr\" must be a finite number, got ", lr.dump());
    }
    job.server_lr = lr.get<float>();
  }
  if (j.contains("memory_budget")) {
    const json& b = j.at("memory_budget");
    try {
      if (b.is_number_unsigned()) {
        job.memory_budget = b.get<std::uint64_t>();
      } else if (b.is_string()) {
        job.memory_budget = parse_byte_size(b.get<std::string>());
      } else {
        fail("must be a byte count or a string such as \"2GiB\"");
      }
    } catch (const Error& e) {
      fail(label, ": \"memory_budget\": ", e.what());
    }
  }
  if (j.contains("threads")) {
    const json& t = j.at("threads");
    if (!t.is_number_unsigned() || t.get<std::uint64_t>() > 1024) {
      fail(label, ": \"threads\" must be an integer in [0, 1024] (0 = every core), got ", t.dump());
    }
    job.threads = t.get<std::size_t>();
  }
  const json& clients = j.at("clients");
  if (!clients.is_array() || clients.empty()) fail(label, ": \"clients\" must be a non-empty array");
  for (std::size_t i = 0; i < clients.size(); ++i) {
    const json& c = clients[i];
    const std::string where = label + ": clients[" + std::to_string(i) + "]";
    if (!c.is_object()) fail(where, " must be an object {name, update|adapter, plan, weight}");
    for (const auto& [k, v] : c.items()) {
      if (k != "name" && k != "update" && k != "adapter" && k != "plan" && k != "weight") {
        fail(where, ": unknown key '", k, "' (expected name, update, adapter, plan, weight)");
      }
    }
    FusionClient fc;
    if (c.contains("update") == c.contains("adapter")) {
      fail(where, " needs exactly one of \"update\" (a sub-model update) and \"adapter\" (a PEFT folder)");
    }
    fc.kind = c.contains("update") ? FusionClient::Kind::kUpdate : FusionClient::Kind::kAdapter;
    fc.path = path_of(fc.kind == FusionClient::Kind::kUpdate ? c.at("update") : c.at("adapter"),
                      fc.kind == FusionClient::Kind::kUpdate ? "clients[].update" : "clients[].adapter");
    if (c.contains("plan")) fc.plan = path_of(c.at("plan"), "clients[].plan");
    if (fc.kind == FusionClient::Kind::kUpdate && !fc.plan) fail(where, ": an update needs a \"plan\"");
    if (c.contains("name")) {
      if (!c.at("name").is_string() || c.at("name").get<std::string>().empty()) {
        fail(where, ": \"name\" must be a non-empty string");
      }
      fc.name = c.at("name").get<std::string>();
    } else {
      // The path as the job gives it (unique, since one file is never two clients).
      fc.name = (fc.kind == FusionClient::Kind::kUpdate ? c.at("update") : c.at("adapter")).get<std::string>();
    }
    if (c.contains("weight")) {
      if (!c.at("weight").is_number()) fail(where, ": \"weight\" must be a number");
      fc.weight = c.at("weight").get<double>();
    }
    job.clients.push_back(std::move(fc));
  }
  return job;
}

FusionReport run_fusion(const FusionJob& job,
                        const std::function<void(const FusionProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const ScopedNumThreads threads_for_this_run(job.threads);  // the caller's count comes back on exit
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

  // Every file and folder the job reads; neither the output nor the report may be, contain
  // or lie inside one of them (io/output_guard.h).
  InputSet inputs;
  if (!job.job_file.empty()) inputs.add(job.job_file, "the job file");
  const Checkpoint target = Checkpoint::open(job.target);
  inputs.add(job.target, "the target");
  inputs.add_checkpoint(target, "the target");
  const fs::path target_folder = fs::is_directory(job.target) ? job.target : job.target.parent_path();
  inputs.add(target_folder / "config.json", "the target's config.json");
  if (job.model_config) inputs.add(*job.model_config, "the model config");
  if (!is_preset(job.schema)) inputs.add(job.schema, "the schema");
  for (const auto& c : job.clients) {
    inputs.add(c.path, (c.kind == FusionClient::Kind::kUpdate ? "the update of client '" : "the adapter of client '") +
                           c.name + "'");
    if (c.plan) inputs.add(*c.plan, "the plan of client '" + c.name + "'");
  }
  // The output first (the writer checks it again when it is made), then the report: not an
  // input, not the output nor inside it, and an existing file is replaced only when it is an
  // earlier report. Its temporary file is made now, so a report that cannot be written fails
  // the job before any work.
  const std::string replace_hint = "set \"replace\": true in the job";
  check_output_folder(job.output, inputs, job.replace, replace_hint);
  InputSet report_guard = inputs;
  report_guard.add(job.output, "the output");
  if (fs::absolute(rep.report_file).lexically_normal() == fs::absolute(job.output).lexically_normal()) {
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
  // Memory model: one tile buffer per thread (a quarter of what the budget leaves after the
  // writer's chunk and its scratch copy), the rest headroom.
  const std::uint64_t fixed = 2 * static_cast<std::uint64_t>(wo.chunk_bytes);
  const std::uint64_t per_thread_min = tile_bytes_per_element(false) * kMinTileElements;
  if (job.memory_budget < fixed + rep.threads * per_thread_min) {
    fail("memory budget of ", job.memory_budget, " bytes is below the engine's minimum of ",
         fixed + rep.threads * per_thread_min, " (", rep.threads,
         " threads x 48 KiB tiles + 2 x 8 MiB writer buffers)");
  }
  rep.tile_elements = tile_elements_for((job.memory_budget - fixed) / 4, rep.threads, false);

  // Resume: the identity covers everything the output bytes depend on (not threads or budget).
  InputIdentity identity;
  identity.add("target", fs::absolute(job.target).lexically_normal().string());
  identity.add("schema", job.schema);
  identity.add("mode", job.mode == AggregateMode::kDelta ? "delta" : "params");
  identity.add("server_lr", json(job.server_lr).dump());
  identity.add_file(job.target);
  if (job.model_config) identity.add_file(*job.model_config);
  if (!is_preset(job.schema)) identity.add_file(job.schema);
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
  wo.resume_identity = identity.text();
  std::map<std::string, TensorCoverage> resumed;  // coverage of tensors kept from a killed run
  wo.on_resumed = [&](std::string_view tensor, std::string_view note, std::uint64_t bytes) {
    resumed[std::string(tensor)] = coverage_of_note(tensor, note);
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
    return coverage_note(agg_for_notes->report()[static_cast<std::size_t>(t - l.tensors().data())]);
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
  rep.triad_bytes_per_second = measure_triad_if_memory_allows(std::max<std::size_t>(triad_n, 1 << 16), 3);

  AggregateOptions ao;
  ao.mode = job.mode;
  ao.server_lr = job.server_lr;
  ao.tile_elements = rep.tile_elements;
  Aggregator agg(layout, ao);
  agg_for_notes = &agg;

  // Canonical order: by name; duplicates (name or file) are rejected.
  std::vector<const FusionClient*> order;
  for (const auto& c : job.clients) order.push_back(&c);
  // Ties (a duplicated name) are broken by path and weight, so which one is kept does not
  // depend on the job file's order either.
  std::sort(order.begin(), order.end(), [](const FusionClient* a, const FusionClient* b) {
    return std::tie(a->name, a->path, a->weight) < std::tie(b->name, b->path, b->weight);
  });
  std::map<std::pair<dev_t, ino_t>, std::string> seen_files;  // the file read -> client name
  std::set<std::string> seen_names;
  std::vector<std::unique_ptr<Checkpoint>> updates;
  // The budget holds the writer's buffers, the tile buffers and the clients' state (their
  // plans and index lists, file indexes, and the most one tensor's per-client state reaches:
  // row lists and adapter factors made for it). Exceeding it is an error before anything is
  // written, whatever the number of clients.
  const std::uint64_t working = fixed + rep.threads * rep.tile_elements * tile_bytes_per_element(false);
  std::uint64_t files_bytes = 0, adapters_bytes = 0;
  std::size_t registered = 0;
  for (const FusionClient* c : order) {
    ++registered;
    try {
      if (!seen_names.insert(c->name).second) fail("duplicate client name '", c->name, "'");
      if (!(c->weight >= kMinWeight && c->weight <= kMaxWeight)) {
        fail("weight ", c->weight, " must be in [1e-12, 1e12]");
      }
      // One file is one client, whatever its spelling, links or hard links: the file read
      // (an update's index or single file, an adapter's weights) is compared by device and inode.
      const fs::path read = c->kind == FusionClient::Kind::kUpdate
                                ? Checkpoint::open(c->path).path()
                                : PeftAdapter::open(c->path).checkpoint().path();
      const auto id = file_id(read);
      if (id) {
        const auto [it, fresh] = seen_files.emplace(std::pair{id->dev, id->ino}, c->name);
        if (!fresh) fail("the same ", c->kind == FusionClient::Kind::kUpdate ? "update" : "adapter",
                         " as client '", it->second, "' (", c->path.string(), ")");
      }
      const float w = static_cast<float>(c->weight);
      std::optional<Plan> plan;
      if (c->plan) plan = parse_plan(read_text(*c->plan), layout, c->plan->string());
      if (c->kind == FusionClient::Kind::kUpdate) {
        updates.push_back(std::make_unique<Checkpoint>(Checkpoint::open(c->path)));
        agg.add(views_of(*updates.back()), *plan, w, c->path.string());
        files_bytes += sizeof(Checkpoint) + 64 * updates.back()->shards().size();
        for (const auto& e : updates.back()->tensors()) files_bytes += sizeof(e) + sizeof(*e.info) + e.info->name.size();
      } else {
        // The aggregator's source keeps the client (and its mapped file) until the round ends.
        auto client = std::make_shared<const AdapterClient>(c->path, layout, plan);
        agg.add_low_rank(client->tensors(), w, c->path.string(),
                         [client](const std::string& t) { return client->make(t); });
        adapters_bytes += client->bytes();
      }
      rep.bytes_read += folder_bytes(c->path);
      rep.accepted.push_back(c->name);
    } catch (const Error& e) {
      rep.rejected.push_back({c->name, e.what()});
    }
    rep.client_state_bytes = agg.resident_bytes() + files_bytes + adapters_bytes;
    if (working + rep.client_state_bytes > job.memory_budget) {
      fail("memory budget: after ", registered, " of ", order.size(), " clients (the last '",
           c->name, "') the clients' state needs ", rep.client_state_bytes,
           " bytes (plans and index lists, file indexes, and one tensor's row lists and adapter "
           "factors), which with the engine's ", working,
           " bytes of writer and tile buffers exceeds the memory budget of ", job.memory_budget,
           " bytes; raise \"memory_budget\" or split the clients over several jobs. The output "
           "was not written");
    }
  }
  if (rep.accepted.empty()) {
    std::string why = rep.rejected.empty() ? "" : rep.rejected.front().name + ": " + rep.rejected.front().reason;
    fail("no valid client contribution to fuse (", rep.rejected.size(), " rejected; first: ", why,
         "); the output was not written");
  }

  // Stream the fused tensors through the writer, reporting progress per piece.
  agg.finalize_to(writer, views_of(target));
  if (fs::exists(target_folder / "config.json")) {
    writer.add_file("config.json", read_text(target_folder / "config.json"));
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

bool is_fusion_report(const fs::path& path) {
  try {
    const json j = json::parse(detail::read_small_file(path, kMaxJobBytes, CheckpointRule::kIo));
    return j.is_object() && j.contains("output") && j.contains("tensors") && j.contains("accepted");
  } catch (const std::exception&) {
    return false;
  }
}

std::string fusion_report_json(const FusionReport& r) {
  json j;
  j["output"] = r.output.string();
  j["seconds"] = r.seconds;
  j["bytes_read"] = r.bytes_read;
  j["bytes_written"] = r.bytes_written;
  j["gb_per_s"] = r.bytes_per_second() / 1e9;
  j["triad_gb_per_s"] = r.triad_bytes_per_second / 1e9;
  j["triad_fraction"] = r.triad_fraction();
  j["threads"] = r.threads;
  j["memory_budget"] = r.memory_budget;
  j["tile_elements"] = r.tile_elements;
  j["client_state_bytes"] = r.client_state_bytes;
  j["resumed_tensors"] = r.resumed_tensors;
  j["resumed_bytes"] = r.resumed_bytes;
  j["accepted"] = r.accepted;
  j["rejected"] = json::array();
  for (const auto& x : r.rejected) j["rejected"].push_back({{"name", x.name}, {"reason", x.reason}});
  j["tensors"] = json::array();
  for (const auto& c : r.coverage) {
    j["tensors"].push_back({{"name", c.name},
                            {"elements", c.elements},
                            {"covered", c.covered},
                            {"fraction", c.fraction()},
                            {"min_contributors", c.min_contributors},
                            {"max_contributors", c.max_contributors}});
  }
  return j.dump(2) + "\n";
}

}  // namespace edgefuse
