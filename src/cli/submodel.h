// The sub-model jobs of the edgefuse program: `plan` and `extract` (`aggregate` is `fuse`).
#pragma once

#include <string>

namespace edgefuse::cli {

struct SchemaArgs {
  std::string schema;  // "llama", "gpt2", "mlp" or a schema JSON file
  std::string config;  // HF config.json for the presets (default: beside the target)
  std::string target;  // checkpoint file or folder (optional for `plan`)
};

// Prints the plan with every policy resolved to explicit index lists, as JSON.
int run_plan(const SchemaArgs& args, const std::string& plan_path);

// Writes the client's sub-model: `out` ending in .safetensors is one file, else a folder.
int run_extract(const SchemaArgs& args, const std::string& plan_path, const std::string& out,
                const std::string& dtype, bool replace);

}  // namespace edgefuse::cli
