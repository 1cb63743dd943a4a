// `edgefuse plan` and `edgefuse extract`: a client's plan resolved, its sub-model cut out.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "edgefuse/core/error.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/core/parallel.h"
#include "src/cli/commands.h"
#include "src/io/io_util.h"
#include "src/plan/json_util.h"
#include "src/plan/load_schema.h"

namespace edgefuse::cli {

namespace fs = std::filesystem;
using detail::fail;
using nlohmann::json;

namespace {

struct SchemaArgs {
  std::string schema;  // "llama", "gpt2", "mlp" or a schema JSON file
  std::string config;  // HF config.json for the presets (default: beside the target)
  std::string target;  // checkpoint file or folder (optional for `plan`)
};

constexpr std::uint64_t kMaxConfigBytes = 64u << 20;

std::string read_text(const fs::path& p) { return detail::read_config_file(p, kMaxConfigBytes); }

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

// The files a command given these schema arguments reads.
InputSet inputs_of(const SchemaArgs& a, const Loaded& l) {
  InputSet in;
  if (l.target) {
    in.add(a.target, "the target");
    in.add_checkpoint(*l.target, "the target");
    in.add(folder_of(a.target) / "config.json", "the target's config.json");
  }
  if (!a.config.empty()) in.add(a.config, "the model config");
  if (!detail::is_preset_schema(a.schema)) in.add(a.schema, "the schema");
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
    check_output_file(dest, opt.inputs, replace, "the output", "pass --replace",
                      &is_safetensors_file);
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
  fmt::print(
      "extracted {} tensors, {} parameters ({} of the target's {}) into {}\n", cts.size(), params,
      percent(total ? static_cast<double>(params) / static_cast<double>(total) : 0.0), total, out);
  return 0;
}

// --schema, --config and --target.
void add_schema_options(CLI::App* cmd, SchemaArgs& a, bool target_required) {
  cmd->add_option("--schema", a.schema, "llama, gpt2, mlp, or a schema JSON file")->required();
  cmd->add_option("--config", a.config,
                  "HF config.json for the llama/gpt2 presets (default: beside the target)");
  auto* t = cmd->add_option("--target", a.target, "Target checkpoint: file, folder or index");
  if (target_required) t->required();
}

}  // namespace

Command add_plan(CLI::App& app) {
  struct Args {
    SchemaArgs schema;
    std::string plan;
    std::size_t threads = num_threads();
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Resolve a client plan's policies against a schema and print it as explicit JSON "
      "index lists");
  add_schema_options(cmd, a->schema, false);
  cmd->add_option("--plan", a->plan, "Plan JSON file")->required();
  add_threads_option(cmd, a->threads);
  return {cmd, [a] {
            set_num_threads(a->threads);
            return run_plan(a->schema, a->plan);
          }};
}

Command add_extract(CLI::App& app) {
  struct Args {
    SchemaArgs schema;
    std::string plan, out, dtype;
    bool replace = false;
    std::size_t threads = num_threads();
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "extract", "Cut a client's sub-model out of the target through its plan (streamed)");
  add_schema_options(cmd, a->schema, true);
  cmd->add_option("--plan", a->plan, "Plan JSON file")->required();
  cmd->add_option("--out", a->out, "Output: a .safetensors file, or a checkpoint folder")
      ->required();
  cmd->add_option("--dtype", a->dtype, "Convert float tensors to f32, bf16 or f16")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  cmd->add_flag("--replace", a->replace,
                "Replace an existing output (a .safetensors file, or a checkpoint folder)");
  add_threads_option(cmd, a->threads);
  return {cmd, [a] {
            set_num_threads(a->threads);
            return run_extract(a->schema, a->plan, a->out, a->dtype, a->replace);
          }};
}
}  // namespace edgefuse::cli
