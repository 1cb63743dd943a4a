// Private: src/plan/load_schema.h.
#include "src/plan/load_schema.h"

#include "edgefuse/core/error.h"
#include "src/plan/json_util.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;

namespace {
std::string read_text(const fs::path& p) { return read_config_file(p, std::uint64_t{64} << 20); }
}  // namespace

Schema load_schema(const std::string& schema, const Checkpoint* target, const fs::path& target_path,
                   const fs::path& config, const char* config_hint) {
  if (schema == "llama" || schema == "gpt2") {
    fs::path cfg = config;
    if (cfg.empty()) {
      if (target_path.empty()) {
        fail("schema preset '", schema, "' needs a model config: ", config_hint, " config.json");
      }
      const fs::path folder =
          fs::is_directory(target_path) ? target_path : target_path.parent_path();
      cfg = folder / "config.json";
      if (!fs::exists(cfg)) {
        fail("schema preset '", schema, "' needs a model config: ", cfg.string(),
             " does not exist (", config_hint, ")");
      }
    }
    return Schema::preset(schema, parse_model_config(read_text(cfg), cfg.string()));
  }
  if (schema == "mlp") {
    if (target == nullptr)
      fail("schema preset 'mlp' is built from the target's tensors: pass --target");
    return Schema::mlp(tensor_metas(*target));
  }
  std::error_code ec;
  if (!fs::exists(schema, ec)) {
    fail("schema '", schema,
         "' is neither a preset (llama, gpt2, mlp) nor an existing schema file");
  }
  return Schema::from_json(read_text(schema), schema);
}

}  // namespace edgefuse::detail
