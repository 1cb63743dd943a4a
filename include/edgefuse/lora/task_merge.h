// edgefuse/lora/task_merge.h — merging K task tensors of one shape into one: task arithmetic,
// magnitude pruning, TIES and DARE, as PEFT's `merge_utils` and as mergekit's generalized
// task arithmetic compute them.
//
// TIES: Yadav et al. 2023 (arXiv 2306.01708); DARE: Yu et al. 2023 (arXiv 2311.03099); task
// arithmetic: Ilharco et al. 2022 (arXiv 2212.04089). PEFT (huggingface/peft
// utils/merge_utils.py, lora.md §1.6) elects signs on the unweighted pruned tensors and takes a
// count mean of the agreeing entries; mergekit (merge_methods/generalized_task_arithmetic.py,
// lora.md §3.1) elects on the weighted tensors, divides by the agreeing weights' sum when
// normalising, and rescales DARE by the L1 norm ratio instead of 1/density. Both are here,
// selected by name; the golden vectors of lora.md §5.10 are the tests.
//
//   std::vector<const float*> tv = {t1.data(), t2.data(), t3.data()};
//   auto merged = edgefuse::merge_tasks(edgefuse::TaskMergeMethod::kTies, tv, 6, {1, 0.5, 1},
//                                       {.density = 0.5});
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace edgefuse {

enum class TaskMergeMethod {
  kTaskArithmetic,       // Σ w_k·x_k (PEFT and mergekit agree)
  kMagnitudePrune,       // PEFT: prune each to its top ⌊density·n⌋ |x|, then Σ w_k·x_k
  kTies,                 // PEFT: prune, elect on unweighted, weight, count mean of agreeing
  kDareLinear,           // PEFT: Bernoulli(density) mask, ÷density, Σ w_k·x_k
  kDareTies,             // PEFT: mask, ÷density, elect on unweighted, count mean
  kMergekitLinear,       // mergekit linear: Σ w_k·x_k / Σ w_k (normalize default on)
  kMergekitTies,         // mergekit ties: prune, weight, elect on weighted, ÷ Σ agreeing w_k
  kMergekitDareLinear,   // mergekit dare_linear: mask, L1 rescale, Σ w_k·x_k
  kMergekitDareTies,     // mergekit dare_ties: mask, L1 rescale, weight, elect, Σ agreeing
};

// "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties",
// "mergekit_linear", "mergekit_ties", "mergekit_dare_linear", "mergekit_dare_ties".
// Throws Error for another name (listing the valid ones).
TaskMergeMethod parse_task_merge_method(std::string_view name);
const char* task_merge_method_name(TaskMergeMethod m);

// Sign election: "total" (PEFT) / "sum" (mergekit) = sign of Σ x_k; "frequency" / "count" =
// sign of Σ sign(x_k). A tie at 0 elects +.
enum class MajoritySign { kTotal, kFrequency };
MajoritySign parse_majority_sign(std::string_view name);  // total|sum|frequency|count

struct TaskMergeOptions {
  double density = 1.0;  // kept fraction, in (0, 1]; 1 = no pruning
  MajoritySign majority_sign = MajoritySign::kTotal;
  // mergekit's `normalize`; unset = the method's default (linear and ties: on, DARE: off).
  std::optional<bool> normalize;
  // DARE: element i of tensor k is kept when u < density, u uniform in [0, 1) from a
  // counter-based SplitMix64 stream keyed by (seed, stream_key, k, i): the same masks for any
  // thread count and on every machine.
  std::uint64_t seed = 0;
  std::string stream_key;
  // Explicit DARE masks (K masks of n bytes, nonzero = keep) instead of drawing them.
  const std::vector<std::vector<std::uint8_t>>* masks = nullptr;
};

// Merges K tensors of n elements. Arithmetic in double, one rounding to f32 per element.
// Throws Error for K = 0, weights.size() != K, non-finite weights or values, density outside
// (0, 1], or masks of the wrong count/size.
std::vector<float> merge_tasks(TaskMergeMethod method, const std::vector<const float*>& tensors,
                               std::size_t n, const std::vector<double>& weights,
                               const TaskMergeOptions& options = {});

// Building blocks, exposed for tests and custom rules.
// Keep the top ⌊density·n⌋ entries by |x| (ties broken toward the lower index), zero the rest;
// density >= 1 keeps everything (PEFT warns and returns the input).
std::vector<double> magnitude_prune(const double* x, std::size_t n, double density);
// The DARE keep mask of tensor `k` (see TaskMergeOptions::seed).
std::vector<std::uint8_t> dare_mask(std::size_t n, double density, std::uint64_t seed,
                                    std::string_view stream_key, std::size_t k);

}  // namespace edgefuse
