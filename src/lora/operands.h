// Private: a LoRA module as the operands of the merge kernel, W (rows x cols) += s·L·R, in the
// layout the weight is stored in (fan_in_fan_out and embedding weights take A^T and B^T).
// Shared by merging (src/lora/adapter.cc) and the fusion engine's low-rank clients.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "edgefuse/core/tensor.h"
#include "edgefuse/lora/adapter.h"

namespace edgefuse::detail {

struct LoraOperands {
  Tensor l, r;  // F32: rows x rank, rank x cols
  std::uint64_t rows, cols, rank;
};

std::shared_ptr<const LoraOperands> lora_operands(const LoraModule& m);

// Throws Error when `peft` holds tensors that change the merged model but are not merged
// (lora_B biases, modules_to_save copies, any tensor that is not a LoRA factor), and, unless
// allow_dora, DoRA magnitudes or a config that sets use_dora: merging without them would be
// silently wrong.
void reject_unmergeable(const PeftAdapter& peft, const std::string& label, bool allow_dora);
// Throws Error naming `fn`, the adapter and the module when a module of `adapter` is DoRA:
// the operation averages, stacks or moves factors, which a magnitude does not follow.
void reject_dora(const char* fn, const LoraAdapter& adapter);
// The module a DoRA magnitude tensor belongs to ("" when `tensor` is not one):
// "base_model.model.m.lora_magnitude_vector[.weight|.default|.default.weight]" -> "m".
std::string dora_magnitude_module(const std::string& tensor);

}  // namespace edgefuse::detail
