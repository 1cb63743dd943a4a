// edgefuse merge-lora / unmerge-lora: adapters (optionally combined) merged into a base
// checkpoint streamed tensor by tensor through the atomic writer.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"
#include "src/cli/commands.h"

namespace edgefuse::cli {

namespace fs = std::filesystem;
using detail::fail;

namespace {

struct LoraArgs {
  std::string base;                   // base checkpoint (file, folder or index)
  std::vector<std::string> adapters;  // PEFT folders
  std::vector<double> weights;        // one per adapter, or none (all 1)
  std::string combine;                // "" = plain merge (one adapter) / cat (several)
  double density = 1.0;
  std::string majority_sign = "total";
  std::optional<std::uint64_t> svd_rank;
  std::optional<double> svd_clamp;
  std::uint64_t seed = 0;
  bool exact_svd_scaling = false;  // *_svd target Σ w·s·B·A instead of PEFT's Σ w·s²·B·A
  std::string out;                 // merged checkpoint folder
  std::string out_adapter;         // or: the combined adapter as a PEFT folder
  bool replace = false;
};

int run_merge_lora(const LoraArgs& a, double factor) {
  const char* cmd = factor < 0 ? "unmerge-lora" : "merge-lora";
  if (a.adapters.empty()) fail(cmd, ": give at least one --adapter");
  if (!a.weights.empty() && a.weights.size() != a.adapters.size()) {
    fail(cmd, ": ", a.weights.size(), " --weight values for ", a.adapters.size(),
         " --adapter folders (give one per adapter, or none)");
  }
  if (a.out.empty() == a.out_adapter.empty())
    fail(cmd, ": give exactly one of --out and --out-adapter");
  if (a.out_adapter.empty() && a.base.empty()) fail(cmd, ": --out needs --base");
  if (!a.out_adapter.empty() && factor < 0) fail(cmd, ": --out-adapter is for merge-lora only");
  CombineOptions co;
  if (!a.combine.empty()) co.type = parse_combination_type(a.combine);
  if (!(a.density > 0.0 && a.density <= 1.0))
    fail(cmd, ": --density ", a.density, " is outside (0, 1]");
  co.density = a.density;
  co.majority_sign = parse_majority_sign(a.majority_sign);
  co.svd_rank = a.svd_rank;
  co.svd_clamp = a.svd_clamp;
  co.seed = a.seed;
  co.peft_svd_scaling = !a.exact_svd_scaling;

  std::vector<LoraAdapter> adapters;
  for (const auto& d : a.adapters) adapters.push_back(load_lora_adapter(d));
  std::vector<double> weights = a.weights;
  if (weights.empty()) weights.assign(adapters.size(), 1.0);

  // One adapter and no --combine: a plain merge, scaled by its weight. Otherwise combine
  // (default cat: the exact weighted sum of the adapters' updates).
  LoraAdapter merged;
  std::string how;
  if (adapters.size() == 1 && a.combine.empty()) {
    if (!std::isfinite(weights[0])) fail(cmd, ": --weight ", weights[0], " is not finite");
    merged = std::move(adapters[0]);
    for (auto& m : merged.modules) m.scaling *= weights[0];
    how = "plain";
  } else {
    std::vector<const LoraAdapter*> ptrs;
    for (const auto& x : adapters) ptrs.push_back(&x);
    merged = combine_adapters(ptrs, weights, co);
    how = combination_type_name(co.type);
  }

  WriteOptions wo;
  wo.replace_existing = a.replace;
  wo.replace_hint = "pass --replace";
  for (std::size_t i = 0; i < a.adapters.size(); ++i) {
    wo.inputs.add(a.adapters[i], "--adapter " + std::to_string(i + 1));
  }
  if (!a.base.empty()) wo.inputs.add(a.base, "the base");
  if (!a.out_adapter.empty()) {
    if (!a.base.empty()) check_lora_targets(Checkpoint::open(a.base), merged);
    save_lora_adapter(a.out_adapter, merged, wo);
    std::printf("wrote %s adapter of %zu module(s) from %zu adapter(s) to %s\n", how.c_str(),
                merged.modules.size(), a.adapters.size(), a.out_adapter.c_str());
    return 0;
  }
  const Checkpoint base = Checkpoint::open(a.base);
  wo.inputs.add_checkpoint(base, "the base");
  CheckpointWriter writer(a.out, wo);
  merge_lora_into(writer, base, merged, factor);
  // config.json and the other small files of a base folder travel with the weights.
  if (fs::is_directory(a.base)) {
    for (const auto& e : fs::directory_iterator(a.base)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file() || name.find(".safetensors") != std::string::npos) continue;
      if (name.empty() || name[0] == '.') continue;
      std::ifstream in(e.path(), std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      writer.add_file(name, ss.str());
    }
  }
  writer.commit();
  std::printf("%s %zu module(s) (%s, %zu adapter(s)) into %zu tensor(s) of %s -> %s\n",
              factor < 0 ? "unmerged" : "merged", merged.modules.size(), how.c_str(),
              a.adapters.size(), base.size(), a.base.c_str(), a.out.c_str());
  return 0;
}

}  // namespace

std::vector<Command> add_merge_lora(CLI::App& app) {
  auto a = std::make_shared<LoraArgs>();
  auto threads = std::make_shared<std::size_t>(num_threads());
  auto lora_options = [a, threads](CLI::App* c) {
    c->add_option("--base", a->base, "Base checkpoint: file, folder or index");
    c->add_option("--adapter", a->adapters, "PEFT adapter folder (repeat for several)")->required();
    c->add_option("--weight", a->weights, "Weight of each adapter, in order (default 1 each)");
    c->add_option("--combine", a->combine,
                  "Combination type: cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, "
                  "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd, "
                  "mergekit_ties_svd, mergekit_dare_linear_svd, mergekit_dare_ties_svd "
                  "(default: plain merge of one adapter, cat of several)");
    c->add_option("--density", a->density, "Kept fraction for the pruning types, in (0, 1]");
    c->add_option("--majority-sign", a->majority_sign, "total or frequency (TIES sign election)");
    c->add_option("--svd-rank", a->svd_rank,
                  "Rank of the *_svd types (default: largest input rank)")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 20));
    c->add_option("--svd-clamp", a->svd_clamp, "Quantile clamp of the *_svd factors, in (0, 1]");
    c->add_flag(
        "--exact-svd-scaling", a->exact_svd_scaling,
        "*_svd types target sum w*s*B*A (federated average) instead of PEFT's sum w*s^2*B*A");
    c->add_option("--seed", a->seed, "Seed of the DARE masks");
    c->add_option("--out", a->out, "Output checkpoint folder (written atomically)");
    c->add_flag("--replace", a->replace, "Replace an existing output folder");
  };
  CLI::App* merge =
      app.add_subcommand("merge-lora",
                         "Merge LoRA adapters (one, or several combined) into a base checkpoint, "
                         "streamed tensor by tensor, or write the combined adapter");
  lora_options(merge);
  merge->add_option("--out-adapter", a->out_adapter,
                    "Write the combined adapter as a PEFT folder instead of merging");
  add_threads_option(merge, *threads);
  CLI::App* unmerge = app.add_subcommand(
      "unmerge-lora", "Subtract LoRA adapters (same arguments as merge-lora) from a checkpoint");
  lora_options(unmerge);
  add_threads_option(unmerge, *threads);
  return {{merge,
           [a, threads] {
             set_num_threads(*threads);
             return run_merge_lora(*a, 1.0);
           }},
          {unmerge, [a, threads] {
             set_num_threads(*threads);
             return run_merge_lora(*a, -1.0);
           }}};
}

}  // namespace edgefuse::cli
