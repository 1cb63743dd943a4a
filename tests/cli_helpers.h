// Shared by the CLI tests: running the edgefuse program, a small sharded bf16 Llama-shaped
// target folder, and comparing a checkpoint with tensors in memory.
#pragma once

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/extract/extract.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/plan/schema.h"
#include "tests/io_helpers.h"

#if defined(EDGEFUSE_CLI)
namespace edgefuse::test {

namespace ef = edgefuse;
namespace fs = std::filesystem;

inline CliRun cli(const ScratchDir& dir, std::vector<std::string> args) {
  args.insert(args.begin(), EDGEFUSE_CLI);
  return run_program(dir, args);
}

inline const char* kConfig =
    R"({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 8, "num_key_value_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 48, "vocab_size": 40, "tie_word_embeddings": true})";

// A bf16 target folder (kConfig: tied embeddings, no lm_head) with config.json; the default
// shard size gives several shards and an index.
inline void write_target(const fs::path& dir, const char* config = kConfig,
                         std::uint64_t max_shard_bytes = 8000) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  ef::WriteOptions opt;
  opt.max_shard_bytes = max_shard_bytes;
  ef::CheckpointWriter w(dir, opt);
  static std::vector<ef::Tensor> keep;
  keep.clear();
  for (const auto& m :
       ef::llama_tensor_metas(ef::parse_model_config(config, "config"), ef::DType::kBF16)) {
    ef::Tensor t = ef::Tensor::empty(m.dtype, m.shape);
    for (std::uint64_t i = 0; i < m.shape.numel(); ++i) {
      float v = nd(rng);
      std::uint32_t b;
      std::memcpy(&b, &v, 4);
      t.view().data_as<ef::BFloat16>()[i].bits = static_cast<std::uint16_t>(b >> 16);
    }
    keep.push_back(std::move(t));
    w.add(m.name, keep.back().view());
  }
  w.add_file("config.json", config);
  w.commit();
}

inline bool same_checkpoints(const ef::Checkpoint& a, const std::vector<ef::NamedTensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& t : b) {
    const auto v = a.view(t.name);
    if (v.nbytes() != t.tensor.nbytes() || v.dtype() != t.tensor.dtype() ||
        std::memcmp(v.bytes(), t.tensor.view().bytes(), v.nbytes()) != 0) {
      return false;
    }
  }
  return true;
}

}  // namespace edgefuse::test
#endif  // EDGEFUSE_CLI
