// The lab's model: a byte-level Llama (vocabulary 256, so any UTF-8 language works) with
// RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP and tied
// embeddings, held as a state_dict under Hugging Face Llama names so that the library's
// "llama" schema binds it. A sub-model is the same network with fewer rows/columns or layers:
// forward reads every size from the tensors (the head size is fixed by the full model).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "edgefuse/interop/torch.h"
#include "lab/corpus.h"
#include "lab/experiment.h"

namespace edgefuse::lab {

inline constexpr std::int64_t kByteVocab = 256;

// The model's config.json (model_type "llama").
std::string config_json(const ModelShape& shape);

// Logits [B, T, 256] of a (sub-)model for byte ids [B, T].
torch::Tensor forward(const StateDict& model, const torch::Tensor& ids, std::int64_t head_dim);

// The initial target: N(0, 0.02) weights (output projections scaled by 1/sqrt(2 layers)),
// unit norms, in the order of the llama preset; reproducible from `seed`.
StateDict initial_model(const ModelShape& shape, std::uint64_t seed);

// F32 safetensors checkpoint folders (atomic; replaces an earlier one).
void save_model(const StateDict& model, const std::filesystem::path& dir,
                const std::string& config);
StateDict load_model(const std::filesystem::path& dir);
StateDict clone(const StateDict& model);

// Parameters of a state_dict.
std::int64_t parameter_count(const StateDict& model);

// `steps` Adam steps (a fresh optimizer at learning rate `lr`) of next-byte cross-entropy on
// batches of `batch` windows, drawn in a Fisher-Yates order of the windows seeded by `seed`.
void train_steps(StateDict& model, const Windows& data, int steps, std::int64_t batch, double lr,
                 std::uint64_t seed, std::int64_t head_dim);

// The same with a caller-owned optimizer (kept across calls) and a running position in the
// order, for a training run that is cut into rounds.
struct Trainer {
  Trainer(StateDict& model, double lr);
  void steps(const Windows& data, int steps, std::int64_t batch, std::uint64_t seed,
             std::int64_t head_dim);
  StateDict& model;
  std::vector<torch::Tensor> params;
  torch::optim::Adam optimizer;
  std::int64_t position = 0;
};

// Held-out bits per UTF-8 character: next-byte cross-entropy summed over every label, in
// bits, divided by the number of characters the labels hold.
double bits_per_character(const StateDict& model, const Windows& test, std::int64_t head_dim);

// 0, 1, ..., n-1 in a Fisher-Yates order (std::mt19937_64 from `seed`).
std::vector<std::int64_t> shuffled(std::int64_t n, std::uint64_t seed);

}  // namespace edgefuse::lab
