// Private: the schema a job or command names, bound the way the CLI and the engine both need.
#pragma once

#include <filesystem>
#include <string>

#include "edgefuse/io/checkpoint.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse::detail {

// Whether `schema` names a preset ("llama", "gpt2", "mlp") rather than a schema file.
inline bool is_preset_schema(const std::string& schema) {
  return schema == "llama" || schema == "gpt2" || schema == "mlp";
}

// `schema` is "llama" or "gpt2" (built from `config`, or from config.json beside
// `target_path` when config is empty), "mlp" (built from the target's tensors) or a schema JSON
// file. `target` may be null when there is none (then `target_path` is empty). `config_hint`
// ends the message when no config is found, e.g. "pass --config".
Schema load_schema(const std::string& schema, const Checkpoint* target,
                   const std::filesystem::path& target_path, const std::filesystem::path& config,
                   const char* config_hint);

}  // namespace edgefuse::detail
