// edgefuse/io/peft.h — LoRA adapters in Hugging Face PEFT's folder format.
//
// A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`
// (huggingface/peft: utils/save_and_load.py, tuners/lora/config.py). Factor
// tensors are named `base_model.model.<module>.lora_A.weight`, shape (r, in_features), and
// `...lora_B.weight`, shape (out_features, r); embedding adapters use `lora_embedding_A`
// (r, num_embeddings) and `lora_embedding_B` (embedding_dim, r). Each pair updates the base
// weight `<module>.weight` by s·B·A (transposed for embeddings and fan_in_fan_out), where the
// scaling s = alpha/r (alpha/sqrt(r) with rsLoRA) uses the first `rank_pattern` /
// `alpha_pattern` key K, in file order, whose regex `(.*\.)?(K)` matches the module name.
// Keys are matched with RE2, in time linear in the name whatever the key (a hostile
// adapter_config.json cannot hang a round); a key RE2 cannot take (backreferences,
// lookaround) or longer than 1024 bytes makes the config invalid.
//
//   auto adapter = edgefuse::PeftAdapter::open("client7/adapter");
//   for (const auto& p : adapter.pairs()) { /* p.base_weight, adapter.a(p), adapter.b(p), p.scaling
//   */ }
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "edgefuse/io/checkpoint.h"

namespace edgefuse {

// The adapter_config.json keys merging needs; every other key is kept verbatim in `other`
// and written back unchanged.
struct LoraConfig {
  std::string peft_type = "LORA";
  std::string base_model_name_or_path;  // "" when null or absent
  int r = 8;                            // PEFT's defaults
  double lora_alpha = 8;
  std::vector<std::string> target_modules;            // list form
  std::optional<std::string> target_modules_pattern;  // string form: a regex or "all-linear"
  bool use_rslora = false;
  bool fan_in_fan_out = false;
  std::vector<std::pair<std::string, int>> rank_pattern;      // in file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  // in file order
  std::map<std::string, std::string> other;                   // key -> JSON text of its value

  // r and alpha for `module` (e.g. "model.layers.0.self_attn.q_proj") after the patterns.
  int rank_for(std::string_view module) const;
  double alpha_for(std::string_view module) const;
  // alpha/r, or alpha/sqrt(r) with use_rslora.
  double scaling_for(std::string_view module) const;
};

// Parses and validates adapter_config.json text (`label` names it in errors): types of the
// known keys, r > 0, finite alpha, peft_type "LORA", patterns that are valid regexes.
// Throws CheckpointError (InvalidAdapter, DuplicateKey).
LoraConfig parse_lora_config(std::string_view json_text, std::string_view label);
// adapter_config.json text for `config` (keys sorted, 2-space indent, as PEFT writes it).
std::string lora_config_json(const LoraConfig& config);

// PEFT's tensor name of a factor: peft_tensor_name("model.layers.0.mlp.up_proj", 'A') ==
// "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".
std::string peft_tensor_name(std::string_view module, char factor);

struct LoraPair {
  enum class Kind { kLinear, kEmbedding };
  Kind kind = Kind::kLinear;
  std::string module;       // "model.layers.0.self_attn.q_proj"
  std::string base_weight;  // "model.layers.0.self_attn.q_proj.weight"
  std::string a_name;       // tensor names in the adapter file
  std::string b_name;
  int rank = 0;
  double alpha = 0;
  double scaling = 0;
  std::uint64_t in_features = 0;   // A's columns (num_embeddings for embeddings)
  std::uint64_t out_features = 0;  // B's rows (embedding_dim for embeddings)
};

// An adapter folder opened for reading (headers only, data mmap'd).
class PeftAdapter {
 public:
  // Reads adapter_config.json and adapter_model.safetensors (or its sharded index) from
  // `folder` and pairs the factors. Throws CheckpointError (InvalidAdapter) for a lone A or B,
  // factors that are not 2-D F32/BF16/F16, ranks that disagree with each other or the config.
  static PeftAdapter open(const std::filesystem::path& folder);

  const LoraConfig& config() const noexcept { return config_; }
  const Checkpoint& checkpoint() const noexcept { return *checkpoint_; }
  // Pairs sorted by module name.
  const std::vector<LoraPair>& pairs() const noexcept { return pairs_; }
  // Tensors that are not LoRA factors (DoRA magnitudes, lora_B biases, modules_to_save).
  const std::vector<std::string>& other_tensors() const noexcept { return other_; }
  ConstTensorView a(const LoraPair& p) const { return checkpoint_->view(p.a_name); }
  ConstTensorView b(const LoraPair& p) const { return checkpoint_->view(p.b_name); }

 private:
  LoraConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::vector<LoraPair> pairs_;
  std::vector<std::string> other_;
};

// One module's factors to write: A is (r, in), B is (out, r).
struct LoraFactors {
  std::string module;
  ConstTensorView a;
  ConstTensorView b;
  // kEmbedding names the factors lora_embedding_A / lora_embedding_B (no ".weight").
  LoraPair::Kind kind = LoraPair::Kind::kLinear;
};

// Writes a PEFT folder (adapter_config.json + adapter_model.safetensors, metadata
// {"format": "pt"}) through CheckpointWriter, so it is committed atomically. Checks each
// pair's shapes against config.rank_for(module). `options.file_stem` is set to adapter_model.
std::vector<std::string> write_peft_adapter(const std::filesystem::path& folder,
                                            const LoraConfig& config,
                                            const std::vector<LoraFactors>& factors,
                                            WriteOptions options = {});

}  // namespace edgefuse
