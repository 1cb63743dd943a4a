// Private: the streamed full-model task merge (aggregate/options.h TaskMergeAggregate). Per
// tensor, passes over each share's task values find its pruning cut, its DARE stream and its
// rescale factor; then each tile merges the shares' values element by element.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "edgefuse/aggregate/options.h"
#include "edgefuse/core/tensor.h"
#include "edgefuse/plan/schema.h"
#include "src/aggregate/gather.h"
#include "src/lora/task_merge_rules.h"

namespace edgefuse::detail {

struct ShareTaskMerge {
  // Magnitude pruning keeps the values whose |x| has f32 bits above cut_bits, and those equal
  // to it at flat elements <= tie_cutoff (all: 0 and the maximum; none: cut_bits 0xFFFFFFFF).
  std::uint32_t cut_bits = 0;
  std::uint64_t tie_cutoff = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t stream = 0;  // DARE's draws
  double scale = 1.0;        // each kept value's factor: mergekit's L1 rescale, PEFT's 1/density
};

struct TensorTaskMerge {
  TaskMergeSpec spec{};
  const TaskMergeAggregate* rule = nullptr;
  bool params = false;  // task values are the clients' weights minus the target
  bool normalize = false;
  std::vector<ShareTaskMerge> shares;  // by share of the tensor
};

// The passes over layout tensor `tensor`'s shares (labels and owners: each share's client and
// its index in the round, the k of its DARE stream). whole_base:
// the target tensor in its dtype (read in params mode). Throws Error naming the client and the
// tensor when a share does not cover the whole tensor or a covered task value is not finite.
TensorTaskMerge plan_task_merge(const TaskMergeAggregate& rule, bool params, std::size_t tensor,
                                const TensorMeta& meta, const std::vector<const Share*>& shares,
                                const std::vector<std::string>& labels,
                                const std::vector<std::size_t>& owners,
                                const std::byte* whole_base);

// One tile of n elements from flat element `first`, every share present gathered in g: acc the
// merged task value (kDelta) or the target plus it, each rounded to f32 (kParams; base_f32 the
// target's values), count the shares present.
void task_merge_tile(const TensorTaskMerge& m, const GatherBuffers& g, const float* base_f32,
                     std::uint64_t first, std::size_t n, float* acc, std::uint32_t* count);

// The target's n values at `bytes` (F32, BF16 or F16) as f32.
void widen_to_f32(const std::byte* bytes, DType dtype, std::size_t n, float* out);

}  // namespace edgefuse::detail
