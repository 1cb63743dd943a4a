// edgefuse/lora/adapter.h — LoRA adapters in memory, and merging them into a base weight.
//
// LoRA (Hu et al. 2021, arXiv 2106.09685) trains a pair per module: A of shape (r, in) and B of
// shape (out, r), and the module's weight becomes W + s·B·A with s = alpha/r (alpha/√r with
// rsLoRA), per-module r and alpha from `rank_pattern` / `alpha_pattern`. Weights stored as
// (in, out) — GPT-2 Conv1D with `fan_in_fan_out`, and embeddings, whose factors PEFT names
// lora_embedding_A (r, num_embeddings) and lora_embedding_B (dim, r) — take (s·B·A)ᵀ. This
// is PEFT's `get_delta_weight` / `merge` / `unmerge` (huggingface/peft tuners/lora/layer.py;
// computed by the blocked kernel of kernels/lora_update.h: fp32
// accumulation, one rounding per element, and B·A never materialised.
//
//   auto adapter = edgefuse::load_lora_adapter("client7/adapter");
//   for (const auto& m : adapter.modules) {
//     edgefuse::merge_lora(weights.at(m.module + ".weight"), m);   // W += s·B·A
//   }
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/core/tensor.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/io/peft.h"

namespace edgefuse {

// One module's adapter: ΔW = scaling·B·A, factors in F32.
struct LoraModule {
  std::string module;  // "model.layers.0.self_attn.q_proj"
  LoraPair::Kind kind = LoraPair::Kind::kLinear;
  bool fan_in_fan_out = false;  // the base weight is stored (in, out)
  Tensor a;                     // F32 (r, in)
  Tensor b;                     // F32 (out, r)
  double scaling = 1.0;
  // DoRA (use_dora): PEFT's lora_magnitude_vector, one value per output feature; empty for
  // plain LoRA. merge_lora then applies merge_dora; combining, federated rules, lifting and
  // saving refuse such modules.
  std::vector<float> magnitude;
  bool dora() const noexcept { return !magnitude.empty(); }

  std::uint64_t rank() const noexcept { return a.shape().rank() == 2 ? a.shape()[0] : 0; }
  std::uint64_t in_features() const noexcept { return a.shape().rank() == 2 ? a.shape()[1] : 0; }
  std::uint64_t out_features() const noexcept { return b.shape().rank() == 2 ? b.shape()[0] : 0; }
  // Whether the base weight is (in, out): embeddings and fan_in_fan_out.
  bool transposed() const noexcept { return kind == LoraPair::Kind::kEmbedding || fan_in_fan_out; }
  // The base weight's shape: (out, in), or (in, out) when transposed().
  Shape weight_shape() const;
  std::string weight_name() const { return module + ".weight"; }
};

// A deep copy (Tensor is move-only).
LoraModule clone(const LoraModule& m);

// Builds a module from factors of any float dtype. Throws Error when A is not (r, in), B not
// (out, r), r differs, or a value is not finite; `label` names the adapter in the message.
LoraModule make_lora_module(std::string module, ConstTensorView a, ConstTensorView b,
                            double scaling, std::string_view label,
                            LoraPair::Kind kind = LoraPair::Kind::kLinear,
                            bool fan_in_fan_out = false);

// An adapter in memory: its configuration and its modules, sorted by module name.
struct LoraAdapter {
  LoraConfig config;
  std::vector<LoraModule> modules;
  std::string label;  // the folder it came from, for error messages

  const LoraModule* find(std::string_view module) const noexcept;
};

LoraAdapter clone(const LoraAdapter& a);

// Reads a PEFT folder (io/peft.h) into memory: factors widened to F32, scaling per module from
// the config's patterns, DoRA magnitudes (`<module>.lora_magnitude_vector`, with or without
// `.weight` / `.default`) attached to their modules. Throws CheckpointError for a malformed
// folder and Error for a non-finite factor or magnitude (naming the folder, tensor and
// element), a magnitude of the wrong length or for a module without factors, use_dora with a
// module lacking its magnitude, and any other tensor (lora_B biases, modules_to_save copies):
// merging without those would be silently wrong.
LoraAdapter load_lora_adapter(const std::filesystem::path& folder);

// Writes `adapter` as a PEFT folder through the atomic writer. The config written is
// adapter.config with r and lora_alpha set so that every module's scaling is its `scaling`:
// r = max rank, rank_pattern for modules of other ranks, alpha_pattern = r_m·scaling_m where
// that differs from the default, use_rslora off (PEFT's add_weighted_adapter inherits it and
// is then too large by √r). Factors are written as F32.
std::vector<std::string> save_lora_adapter(const std::filesystem::path& folder,
                                           const LoraAdapter& adapter, WriteOptions options = {});

// W += factor·scaling·B·A (the transpose when m.transposed()), in place, for an F32, BF16 or
// F16 weight; factor = -1 unmerges. A DoRA module (m.dora()) is merged with merge_dora
// (factor 1 only: unmerging needs the norms merge_dora returns). Throws Error when the
// weight's dtype or shape does not fit m (naming m.module). Bitwise identical for any thread
// count.
void merge_lora(TensorView weight, const LoraModule& m, double factor = 1.0);
inline void unmerge_lora(TensorView weight, const LoraModule& m) { merge_lora(weight, m, -1.0); }
// DoRA (Liu et al., ICML 2024, arXiv 2402.09353) as PEFT merges it: with
// V = W + s·B·A in (out, in) layout (the transpose for fan_in_fan_out) and n_i the L2 norm of
// V's row i, W becomes (m_i / n_i)·V row by row, `magnitude` being PEFT's
// lora_magnitude_vector (out values). In double, one rounding per element. Returns n (PEFT
// caches it: unmerging needs it, since W's new rows all have norm m_i). Throws Error for an
// embedding module, a magnitude of the wrong length, a non-finite or negative magnitude, a
// zero row norm, or what merge_lora refuses.
std::vector<double> merge_dora(TensorView weight, const LoraModule& m,
                               const std::vector<float>& magnitude);
// The inverse: W = V / (m_i / n_i) − s·B·A with the norms merge_dora returned.
void unmerge_dora(TensorView weight, const LoraModule& m, const std::vector<float>& magnitude,
                  const std::vector<double>& weight_norm);

// Checks that every module of `adapter` targets a tensor of `base` of the right shape and a
// float dtype. Throws Error naming adapter.label, the module and the rule broken.
void check_lora_targets(const Checkpoint& base, const LoraAdapter& adapter);

// Streams `base` into `writer` with every module of `adapter` merged (factor 1) or unmerged
// (factor -1): each weight a module targets is produced piece by piece as base + factor·ΔW,
// every other tensor is copied, names and dtypes are kept. DoRA modules (merge only) are
// produced as merge_dora computes them, bit for bit, their row norms computed from the base
// before anything is declared. Validates first (check_lora_targets, DoRA norms), so nothing
// is declared when the adapter does not fit. The caller commits. `base` must outlive the
// commit.
void merge_lora_into(CheckpointWriter& writer, const Checkpoint& base, const LoraAdapter& adapter,
                     double factor = 1.0);

}  // namespace edgefuse
