// The LoRA jobs of the edgefuse program: `merge-lora` and `unmerge-lora`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace edgefuse::cli {

struct LoraArgs {
  std::string base;                  // base checkpoint (file, folder or index)
  std::vector<std::string> adapters; // PEFT folders
  std::vector<double> weights;       // one per adapter, or none (all 1)
  std::string combine;               // "" = plain merge (one adapter) / cat (several)
  double density = 1.0;
  std::string majority_sign = "total";
  std::optional<std::uint64_t> svd_rank;
  std::optional<double> svd_clamp;
  std::uint64_t seed = 0;
  bool exact_svd_scaling = false;    // *_svd target Σ w·s·B·A instead of PEFT's Σ w·s²·B·A
  std::string out;                   // merged checkpoint folder
  std::string out_adapter;           // or: the combined adapter as a PEFT folder
  bool replace = false;
};

// factor = 1 merges, -1 unmerges. Prints one summary line; returns the exit status.
int run_merge_lora(const LoraArgs& args, double factor);

}  // namespace edgefuse::cli
