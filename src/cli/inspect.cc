// `edgefuse inspect`: the tensors of a checkpoint or PEFT adapter folder.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <numeric>

#include "edgefuse/io/checkpoint.h"
#include "edgefuse/io/peft.h"
#include "src/cli/commands.h"

namespace edgefuse::cli {

namespace {

std::string shape_text(const Shape& s) {
  std::string out = "[";
  for (int i = 0; i < s.rank(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void print_tensors(const Checkpoint& c) {
  fmt::print("{}: {} tensor(s) in {} shard(s), {} data bytes\n", c.path().string(), c.size(),
             c.shards().size(), c.total_bytes());
  for (const auto& [k, v] : c.index_metadata()) fmt::print("index metadata: {} = {}\n", k, v);
  for (const auto& shard : c.shards()) {
    for (const auto& [k, v] : shard.metadata()) {
      fmt::print("metadata of {}: {} = {}\n", shard.path().filename().string(), k,
                 v.size() > 120 ? v.substr(0, 120) + "..." : v);
    }
  }
  std::size_t width = 4;
  for (const auto& e : c.tensors()) width = std::max(width, e.info->name.size());
  width = std::min<std::size_t>(width, 80);
  fmt::print("{:<{}}  {:<11}  {:<20}  {:>14}{}\n", "name", width, "dtype", "shape", "bytes",
             c.is_sharded() ? "  shard" : "");
  for (const auto& e : c.tensors()) {
    fmt::print("{:<{}}  {:<11}  {:<20}  {:>14}{}\n", e.info->name, width, dtype_name(e.info->dtype),
               shape_text(e.info->shape), e.info->nbytes(),
               c.is_sharded() ? "  " + e.file->path().filename().string() : "");
  }
}

int run_inspect(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec) && fs::exists(fs::path(path) / "adapter_config.json", ec)) {
    const PeftAdapter a = PeftAdapter::open(path);
    const LoraConfig& c = a.config();
    std::string targets = c.target_modules_pattern.value_or("");
    if (!c.target_modules_pattern) {
      for (std::size_t i = 0; i < c.target_modules.size(); ++i) {
        targets += (i ? ", " : "") + c.target_modules[i];
      }
    }
    fmt::print("adapter: peft_type {}, r {}, lora_alpha {}, use_rslora {}, fan_in_fan_out {}\n",
               c.peft_type, c.r, c.lora_alpha, c.use_rslora, c.fan_in_fan_out);
    fmt::print("adapter: base_model_name_or_path {}\n",
               c.base_model_name_or_path.empty() ? "(none)" : c.base_model_name_or_path);
    fmt::print("adapter: target_modules {}\n", targets.empty() ? "(none)" : targets);
    for (const auto& [k, v] : c.rank_pattern) fmt::print("adapter: rank_pattern {} = {}\n", k, v);
    for (const auto& [k, v] : c.alpha_pattern) fmt::print("adapter: alpha_pattern {} = {}\n", k, v);
    fmt::print("adapter: {} LoRA pair(s), {} other tensor(s)\n", a.pairs().size(),
               a.other_tensors().size());
    for (const auto& p : a.pairs()) {
      fmt::print("pair: {} -> {}  r {}  scaling {}  ({} x {}){}\n", p.module, p.base_weight, p.rank,
                 p.scaling, p.out_features, p.in_features,
                 p.kind == LoraPair::Kind::kEmbedding ? "  embedding" : "");
    }
    print_tensors(a.checkpoint());
    return 0;
  }
  print_tensors(Checkpoint::open(path));
  return 0;
}

}  // namespace

Command add_inspect(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "List the tensors (name, dtype, shape, bytes) of a .safetensors file, an index "
      "JSON, a checkpoint folder or a PEFT adapter folder (with its adapter config)");
  cmd->add_option("path", *path, "File or folder to inspect")->required();
  return {cmd, [path] { return run_inspect(*path); }};
}

}  // namespace edgefuse::cli
