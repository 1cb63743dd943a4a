// edgefuse merge-lora / unmerge-lora: adapters (optionally combined) merged into a base
// checkpoint streamed tensor by tensor through the atomic writer.
#include "src/cli/lora.h"

#include <fmt/core.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "edgefuse/core/error.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"

namespace edgefuse::cli {

namespace fs = std::filesystem;
using detail::fail;

int run_merge_lora(const LoraArgs& a, double factor) {
  const char* cmd = factor < 0 ? "unmerge-lora" : "merge-lora";
  if (a.adapters.empty()) fail(cmd, ": give at least one --adapter");
  if (!a.weights.empty() && a.weights.size() != a.adapters.size()) {
    fail(cmd, ": ", a.weights.size(), " --weight values for ", a.adapters.size(),
         " --adapter folders (give one per adapter, or none)");
  }
  if (a.out.empty() == a.out_adapter.empty()) fail(cmd, ": give exactly one of --out and --out-adapter");
  if (a.out_adapter.empty() && a.base.empty()) fail(cmd, ": --out needs --base");
  if (!a.out_adapter.empty() && factor < 0) fail(cmd, ": --out-adapter is for merge-lora only");
  CombineOptions co;
  if (!a.combine.empty()) co.type = parse_combination_type(a.combine);
  if (!(a.density > 0.0 && a.density <= 1.0)) fail(cmd, ": --density ", a.density, " is outside (0, 1]");
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

}  // namespace edgefuse::cli
