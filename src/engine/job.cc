// Fusion jobs read from job files (engine/job.h).
#include "edgefuse/engine/job.h"

#include <cmath>
#include <map>
#include <set>

#include "edgefuse/core/error.h"
#include "src/core/parse_number.h"
#include "src/engine/job_files.h"
#include "src/engine/job_rules.h"
#include "src/plan/json_util.h"
#include "src/plan/load_schema.h"

namespace edgefuse {

using detail::fail;
using nlohmann::json;
namespace fs = std::filesystem;

std::uint64_t parse_byte_size(const std::string& text) {
  double v = 0;
  const std::size_t used = detail::parse_double_prefix(text, &v);
  if (used == 0 || !(v >= 0) || !std::isfinite(v)) {
    fail("memory size '", text, "' is not a number of bytes (e.g. 2GiB, 512MiB, 1.5GB)");
  }
  std::string unit = text.substr(used);
  unit.erase(0, unit.find_first_not_of(' '));
  static const std::map<std::string, double> units{{"", 1},
                                                   {"B", 1},
                                                   {"K", 1e3},
                                                   {"KB", 1e3},
                                                   {"M", 1e6},
                                                   {"MB", 1e6},
                                                   {"G", 1e9},
                                                   {"GB", 1e9},
                                                   {"T", 1e12},
                                                   {"TB", 1e12},
                                                   {"KiB", 1024.0},
                                                   {"MiB", 1048576.0},
                                                   {"GiB", 1073741824.0},
                                                   {"TiB", 1099511627776.0}};
  const auto it = units.find(unit);
  if (it == units.end()) fail("memory size '", text, "': unknown unit '", unit, "'");
  const double bytes = v * it->second;
  if (bytes > 1.8e19) fail("memory size '", text, "' is too large");
  return static_cast<std::uint64_t>(bytes);
}

FusionJob parse_fusion_job(const fs::path& job_file) {
  const std::string label = job_file.string();
  const json j =
      detail::parse_config_json(detail::read_config_file(job_file, detail::kMaxJobBytes), label);
  if (!j.is_object()) fail(label, ": a job must be a JSON object");
  const fs::path base = job_file.parent_path();
  auto path_of = [&](const json& v, const std::string& what) -> fs::path {
    if (!v.is_string() || v.get<std::string>().empty()) {
      fail(label, ": \"", what, "\" must be a non-empty path string");
    }
    const fs::path p = v.get<std::string>();
    return p.is_absolute() ? p : base / p;
  };
  static const std::set<std::string> known{
      "target",  "schema",        "model_config", "output",           "report",
      "replace", "mode",          "server_lr",    "server_optimizer", "aggregation",
      "clip",    "memory_budget", "threads",      "clients"};
  for (const auto& [k, v] : j.items()) {
    if (!known.count(k)) {
      fail(label, ": unknown key '", k,
           "' (expected target, schema, model_config, output, report, "
           "replace, mode, server_lr, server_optimizer, aggregation, clip, memory_budget, "
           "threads, clients)");
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
  if (!detail::is_preset_schema(job.schema)) {
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
  if (j.contains("server_optimizer")) {
    if (j.contains("server_lr")) {
      fail(label,
           ": \"server_lr\" and \"server_optimizer\" do not go together (the optimizer has its "
           "own \"lr\")");
    }
    job.server_optimizer = detail::parse_server_optimizer(j.at("server_optimizer"), label, base);
    job.server_optimizer->step.delta = job.mode == AggregateMode::kDelta;
  }
  if (j.contains("aggregation"))
    job.aggregation = detail::parse_aggregation(j.at("aggregation"), label);
  if (job.aggregation.centered_clip && job.mode != AggregateMode::kDelta) {
    fail(label,
         ": \"aggregation\": centered_clip needs \"mode\": \"delta\" (it clips the clients' "
         "updates around the previous aggregate)");
  }
  if (j.contains("clip")) {
    if (job.mode != AggregateMode::kDelta) {
      fail(label,
           ": \"clip\" needs \"mode\": \"delta\" (it bounds the norms of the clients' "
           "updates)");
    }
    job.clip = detail::parse_clip(j.at("clip"), label, base);
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
  if (!clients.is_array() || clients.empty())
    fail(label, ": \"clients\" must be a non-empty array");
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
      fail(where,
           " needs exactly one of \"update\" (a sub-model update) and \"adapter\" (a PEFT folder)");
    }
    fc.kind = c.contains("update") ? FusionClient::Kind::kUpdate : FusionClient::Kind::kAdapter;
    fc.path =
        path_of(fc.kind == FusionClient::Kind::kUpdate ? c.at("update") : c.at("adapter"),
                fc.kind == FusionClient::Kind::kUpdate ? "clients[].update" : "clients[].adapter");
    if (c.contains("plan")) fc.plan = path_of(c.at("plan"), "clients[].plan");
    if (fc.kind == FusionClient::Kind::kUpdate && !fc.plan)
      fail(where, ": an update needs a \"plan\"");
    if (c.contains("name")) {
      if (!c.at("name").is_string() || c.at("name").get<std::string>().empty()) {
        fail(where, ": \"name\" must be a non-empty string");
      }
      fc.name = c.at("name").get<std::string>();
    } else {
      // The path as the job gives it (unique, since one file is never two clients).
      fc.name = (fc.kind == FusionClient::Kind::kUpdate ? c.at("update") : c.at("adapter"))
                    .get<std::string>();
    }
    if (c.contains("weight")) {
      if (!c.at("weight").is_number()) fail(where, ": \"weight\" must be a number");
      fc.weight = c.at("weight").get<double>();
    }
    job.clients.push_back(std::move(fc));
  }
  return job;
}

}  // namespace edgefuse
