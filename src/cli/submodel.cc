// `edgefuse plan`, `edgefuse extract` and `edgefuse aggregate` (src/cli/submodel.h).
#include "src/cli/submodel.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "edgefuse/core/error.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/io/checkpoint.h"
#include "src/io/io_util.h"
#include "src/plan/json_util.h"
#include "src/plan/load_schema.h"

namespace edgefuse::cli {

namespace fs = std::filesystem;
using detail::fail;
using nlohmann::json;

namespace {

constexpr std::uint64_t kMaxConfigBytes = 64u << 20;

std::string read_text(const fs::path& p) {
  return detail::read_small_file(p, kMaxConfigBytes, CheckpointRule::kInvalidArgument);
}

fs::path folder_of(const fs::path& target) {
  return fs::is_directory(target) ? target : target.parent_path();
}

struct Loaded {
  std::optional<Checkpoint> target;
  std::optional<ModelLayout> layout;
};

Loaded load(const SchemaArgs& a) {
  Loaded l;
  if (!a.target.empty()) l.target = Checkpoint::open(a.target);
  const Schema s = detail::load_schema(a.schema, l.target ? &*l.target : nullptr, a.target,
                                       a.config, "pass --config");
  l.layout = s.bind(l.target ? tensor_metas(*l.target) : std::vector<TensorMeta>{});
  return l;
}

std::optional<DType> parse_dtype(const std::string& s) {
  if (s.empty()) return std::nullopt;
  if (s == "f32" || s == "F32") return DType::kF32;
  if (s == "bf16" || s == "BF16") return DType::kBF16;
  if (s == "f16" || s == "F16") return DType::kF16;
  fail("--dtype: '", s, "' is not one of f32, bf16, f16");
}

std::string percent(double f) { return fmt::format("{:.2f}%", 100.0 * f); }

bool is_preset(const std::string& schema) {
  return schema == "llama" || schema == "gpt2" || schema == "mlp";
}

// The files a command given these schema arguments reads.
InputSet inputs_of(const SchemaArgs& a, const Loaded& l) {
  InputSet in;
  if (l.target) {
    in.add(a.target, "the target");
    in.add_checkpoint(*l.target, "the target");
    in.add(folder_of(a.target) / "config.json", "the target's config.json");
  }
  if (!a.config.empty()) in.add(a.config, "the model config");
  if (!is_preset(a.schema)) in.add(a.schema, "the schema");
  return in;
}

bool is_safetensors_file(const fs::path& p) {
  try {
    SafetensorsFile::open(p);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

int run_plan(const SchemaArgs& args, const std::string& plan_path) {
  const Loaded l = load(args);
  const Plan p = parse_plan(read_text(plan_path), *l.layout, plan_path);
  fmt::print("{}\n", plan_to_json(p));
  return 0;
}

int run_extract(const SchemaArgs& args, const std::string& plan_path, const std::string& out,
                const std::string& dtype, bool replace) {
  if (args.target.empty()) fail("extract: --target is required");
  const Loaded l = load(args);
  const Plan p = parse_plan(read_text(plan_path), *l.layout, plan_path);
  const auto views = views_of(*l.target);
  const fs::path dest(out);
  const bool single = dest.extension() == ".safetensors";
  WriteOptions opt;
  opt.inputs = inputs_of(args, l);
  opt.inputs.add(plan_path, "the plan");
  opt.replace_existing = replace;
  opt.replace_hint = "pass --replace";
  if (single) {
    // One file: write a one-shard checkpoint beside it, then rename its file into place.
    check_output_file(dest, opt.inputs, replace, "the output", "pass --replace", &is_safetensors_file);
    opt.max_shard_bytes = UINT64_MAX;
    opt.replace_existing = true;
    const fs::path stage = dest.parent_path().empty() ? fs::path(".") : dest.parent_path();
    const fs::path dir = stage / ("." + dest.filename().string() + ".edgefuse-extract");
    {
      CheckpointWriter w(dir, opt);
      extract_to(w, views, *l.layout, p, parse_dtype(dtype));
      w.commit();
    }
    std::error_code ec;
    fs::rename(dir / "model.safetensors", dest, ec);
    if (ec) fail(dest.string(), ": cannot move the extracted file into place: ", ec.message());
    detail::fsync_directory(stage);
    fs::remove_all(dir, ec);
  } else {
    CheckpointWriter w(dest, opt);
    extract_to(w, views, *l.layout, p, parse_dtype(dtype));
    w.commit();
  }
  const auto cts = client_tensors(*l.layout, p, parse_dtype(dtype));
  std::uint64_t params = 0, total = 0;
  for (const auto& c : cts) params += c.shape.numel();
  for (const auto& t : l.layout->tensors()) total += t.meta.shape.numel();
  fmt::print("extracted {} tensors, {} parameters ({} of the target's {}) into {}\n", cts.size(),
             params, percent(total ? static_cast<double>(params) / static_cast<double>(total) : 0.0),
             total, out);
  return 0;
}

int run_aggregate(const std::string& job_path) {
  const json job = detail::parse_config_json(read_text(job_path), job_path);
  if (!job.is_object()) fail(job_path, ": a job must be a JSON object");
  const fs::path base = fs::path(job_path).parent_path();
  auto path_of = [&](const json& v, const std::string& what) -> std::string {
    if (!v.is_string() || v.get<std::string>().empty()) {
      fail(job_path, ": ", what, " must be a non-empty path string");
    }
    const fs::path p = v.get<std::string>();
    return (p.is_absolute() ? p : base / p).string();
  };
  for (const auto& [k, v] : job.items()) {
    static const char* known[] = {"target", "schema", "model_config", "mode", "server_lr",
                                  "output", "replace", "clients"};
    if (std::find(std::begin(known), std::end(known), k) == std::end(known)) {
      fail(job_path, ": unknown key '", k, "' (expected target, schema, model_config, mode, "
                     "server_lr, output, replace, clients)");
    }
  }
  for (const char* k : {"target", "schema", "output", "clients"}) {
    if (!job.contains(k)) fail(job_path, ": \"", k, "\" is required");
  }
  SchemaArgs sa;
  sa.target = path_of(job.at("target"), "target");
  const std::string schema = job.at("schema").is_string() ? job.at("schema").get<std::string>() : "";
  if (schema.empty()) fail(job_path, ": schema must be \"llama\", \"gpt2\", \"mlp\" or a file");
  sa.schema = (schema == "llama" || schema == "gpt2" || schema == "mlp")
                  ? schema
                  : path_of(job.at("schema"), "schema");
  if (job.contains("model_config")) sa.config = path_of(job.at("model_config"), "model_config");
  AggregateOptions opt;
  if (job.contains("mode")) {
    const auto& m = job.at("mode");
    if (m == "params") {
      opt.mode = AggregateMode::kParams;
    } else if (m == "delta") {
      opt.mode = AggregateMode::kDelta;
    } else {
      fail(job_path, ": mode must be \"params\" or \"delta\", got ", m.dump());
    }
  }
  if (job.contains("server_lr")) {
    const auto& lr = job.at("server_lr");
    if (!lr.is_number() || !std::isfinite(lr.get<double>())) {
      fail(job_path, ": server_lr must be a finite number, got ", lr.dump());
    }
    opt.server_lr = lr.get<float>();
  }
  bool replace = false;
  if (job.contains("replace")) {
    if (!job.at("replace").is_boolean()) fail(job_path, ": replace must be true or false");
    replace = job.at("replace").get<bool>();
  }
  const std::string output = path_of(job.at("output"), "output");
  const json& clients = job.at("clients");
  if (!clients.is_array() || clients.empty()) fail(job_path, ": clients must be a non-empty array");

  const Loaded l = load(sa);
  // The writer checks the destination now, before any client is read.
  WriteOptions wo;
  wo.replace_existing = replace;
  wo.replace_hint = "set \"replace\": true in the job";
  wo.inputs = inputs_of(sa, l);
  wo.inputs.add(job_path, "the job file");
  for (std::size_t i = 0; i < clients.size(); ++i) {
    const json& c = clients[i];
    for (const char* k : {"update", "plan"}) {
      if (c.is_object() && c.contains(k) && c.at(k).is_string() && !c.at(k).get<std::string>().empty()) {
        wo.inputs.add(path_of(c.at(k), k), std::string("the ") + k + " of clients[" + std::to_string(i) + "]");
      }
    }
  }
  CheckpointWriter w(output, wo);
  Aggregator agg(*l.layout, opt);
  std::vector<Checkpoint> updates;
  updates.reserve(clients.size());
  std::size_t rejected = 0;
  for (std::size_t i = 0; i < clients.size(); ++i) {
    const json& c = clients[i];
    const std::string where = job_path + ": clients[" + std::to_string(i) + "]";
    if (!c.is_object()) fail(where, " must be an object {update, plan, weight}");
    for (const auto& [k, v] : c.items()) {
      if (k != "update" && k != "plan" && k != "weight") {
        fail(where, ": unknown key '", k, "' (expected update, plan, weight)");
      }
    }
    if (!c.contains("update") || !c.contains("plan")) fail(where, " needs \"update\" and \"plan\"");
    const std::string update = path_of(c.at("update"), "clients[].update");
    const std::string plan = path_of(c.at("plan"), "clients[].plan");
    double weight = 1.0;
    if (c.contains("weight")) {
      if (!c.at("weight").is_number()) fail(where, ": weight must be a number");
      weight = c.at("weight").get<double>();
    }
    try {
      updates.push_back(Checkpoint::open(update));
      const Plan p = parse_plan(read_text(plan), *l.layout, plan);
      agg.add(views_of(updates.back()), p, static_cast<float>(weight), update);
    } catch (const Error& e) {
      // An untrusted client's bad update costs only that client.
      ++rejected;
      std::fprintf(stderr, "rejected client %zu: %s\n", i, e.what());
    }
  }
  if (agg.num_clients() == 0) fail(job_path, ": every client was rejected");
  const fs::path cfg = folder_of(sa.target) / "config.json";
  if (fs::is_directory(sa.target) && fs::exists(cfg)) w.add_file("config.json", read_text(cfg));
  const auto views = views_of(*l.target);
  agg.finalize_to(w, views);
  w.commit();

  std::uint64_t total = 0, covered = 0;
  std::size_t width = 6;
  for (const auto& r : agg.report()) width = std::max(width, std::min<std::size_t>(r.name.size(), 72));
  fmt::print("{:<{}}  {:>12}  {:>8}  {:>5}  {:>5}\n", "tensor", width, "elements", "covered",
             "min", "max");
  for (const auto& r : agg.report()) {
    fmt::print("{:<{}}  {:>12}  {:>8}  {:>5}  {:>5}\n", r.name, width, r.elements,
               percent(r.fraction()), r.min_contributors, r.max_contributors);
    total += r.elements;
    covered += r.covered;
  }
  fmt::print("fused {} client(s) ({} rejected) into {}: {} of {} elements covered ({})\n",
             agg.num_clients(), rejected, output, covered, total,
             percent(total ? static_cast<double>(covered) / static_cast<double>(total) : 0.0));
  return 0;
}

}  // namespace edgefuse::cli
