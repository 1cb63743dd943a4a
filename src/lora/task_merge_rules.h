// Private: the per-element rules of merge_tasks (lora/task_merge.h), shared by the in-memory
// merge and the streamed full-model merge of an Aggregator (aggregate/options.h
// TaskMergeAggregate), so that both compute each element with the same arithmetic.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "edgefuse/lora/task_merge.h"

namespace edgefuse::detail {

// How a method sparsifies each task tensor and combines them per element.
struct TaskMergeSpec {
  enum Sparsify { kNone, kMagnitude, kRandom, kBreadcrumbs, kDella } sparsify;
  bool consensus;  // sign election
  bool mergekit;   // weighted election, weight-sum divisor, L1 rescale, at least one kept
  bool normalize_default;
};
TaskMergeSpec task_merge_spec(TaskMergeMethod m);

// The entries magnitude pruning keeps of n: ⌊density·n⌋, at least one for mergekit's
// methods (its `magnitude` keeps max(1, int(density·n))), all when density >= 1.
std::size_t magnitude_keep_count(const TaskMergeSpec& spec, double density, std::size_t n);

// The SplitMix64 stream of task tensor k under `stream_key`, and its uniform [0, 1) draw for
// element i: DARE keeps element i when the draw is below the density.
std::uint64_t task_mask_stream(std::uint64_t seed, std::string_view stream_key, std::size_t k);
double task_uniform_draw(std::uint64_t stream, std::uint64_t i);

// mergekit's L1 rescale factor ‖original‖₁ / ‖kept‖₁, or 1 when either is below 1e-7.
double l1_rescale_factor(double original_l1, double kept_l1);

// One element's merged value from the K sparsified (and rescaled) task values x[k] and their
// weights w[k], in double: the weighted sum, the sign election and the divisor of the method.
double combine_task_element(const TaskMergeSpec& spec, const double* x, const double* w,
                            std::size_t K, MajoritySign majority_sign, bool normalize);

}  // namespace edgefuse::detail
