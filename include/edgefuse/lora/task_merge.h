// edgefuse/lora/task_merge.h — merging K task tensors of one shape into one: task arithmetic,
// magnitude pruning, TIES, DARE, Breadcrumbs and DELLA, as PEFT's `merge_utils` and as
// mergekit's generalized task arithmetic compute them; mergekit's Model Stock and SLERP.
//
// TIES: Yadav et al. 2023 (arXiv 2306.01708); DARE: Yu et al. 2023 (arXiv 2311.03099); task
// arithmetic: Ilharco et al. 2022 (arXiv 2212.04089). PEFT (huggingface/peft
// utils/merge_utils.py) elects signs on the unweighted pruned tensors and takes a
// count mean of the agreeing entries; mergekit (merge_methods/generalized_task_arithmetic.py)
// elects on the weighted tensors, divides by the agreeing weights' sum when
// normalising, and rescales DARE by the L1 norm ratio instead of 1/density. Both are here,
// selected by name; tests/lora_test.cc checks each against golden vectors.
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
  kTaskArithmetic,      // Σ w_k·x_k (PEFT and mergekit agree)
  kMagnitudePrune,      // PEFT: prune each to its top ⌊density·n⌋ |x|, then Σ w_k·x_k
  kTies,                // PEFT: prune, elect on unweighted, weight, count mean of agreeing
  kDareLinear,          // PEFT: Bernoulli(density) mask, ÷density, Σ w_k·x_k
  kDareTies,            // PEFT: mask, ÷density, elect on unweighted, count mean
  kMergekitLinear,      // mergekit linear: Σ w_k·x_k / Σ w_k (normalize default on)
  kMergekitTies,        // mergekit ties: prune, weight, elect on weighted, ÷ Σ agreeing w_k
  kMergekitDareLinear,  // mergekit dare_linear: mask, L1 rescale, Σ w_k·x_k
  kMergekitDareTies,    // mergekit dare_ties: mask, L1 rescale, weight, elect, Σ agreeing
  // Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795), mergekit's
  // magnitude_outliers sparsifier: drop the ⌊gamma·n⌋ largest |x| and the smallest, keeping
  // ⌊density·n⌋ entries; no rescale. _ties adds mergekit's weighted sign election.
  kMergekitBreadcrumbs,
  kMergekitBreadcrumbsTies,
  // DELLA (Deep et al. 2024, arXiv 2406.11617), mergekit's della_magprune: per row, keep each
  // entry with probability density − ε + 2ε·(its |x| rank normalised to [0, 1]), then L1
  // rescale; della elects signs and normalises, della_linear does neither.
  kMergekitDella,
  kMergekitDellaLinear,
};

// "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties",
// "mergekit_linear", "mergekit_ties", "mergekit_dare_linear", "mergekit_dare_ties",
// "mergekit_breadcrumbs", "mergekit_breadcrumbs_ties", "mergekit_della", "mergekit_della_linear".
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
  // Explicit DARE or DELLA masks (K masks of n bytes, nonzero = keep) instead of drawing them.
  const std::vector<std::vector<std::uint8_t>>* masks = nullptr;
  double gamma = 0.01;  // breadcrumbs: the fraction of largest entries dropped (mergekit's default)
  double epsilon = 0.15;    // DELLA: half-width of the keep probabilities (mergekit's default)
  std::size_t row_len = 0;  // DELLA ranks within rows of this length (0: the tensor is one row)
  // mergekit's `rescale` (L1); unset = the method's default (DARE and DELLA on, others off).
  std::optional<bool> rescale;
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
// Breadcrumbs: with n_top = ⌊gamma·n⌋ and n_bot = n − ⌊density·n⌋ − n_top (if negative,
// n_top shrinks by as much and n_bot = 0), keeps the entries at positions [n_bot, n − n_top)
// of the ascending |x| order (ties toward the lower index). mergekit writes the slice as
// [n_bot:-n_top], which is empty when n_top = 0 and prunes everything (any
// tensor under 100 elements at gamma 0.01); here n_top = 0 keeps the top ⌊density·n⌋.
std::vector<double> breadcrumbs_prune(const double* x, std::size_t n, double density, double gamma);
// DELLA's keep probability of each entry: rows of `row_len` (0: one row), ranks 1..m of |x|
// ascending within the row (ties toward the lower index), p = density − ε + 2ε·(rank − 1)/(m − 1)
// (density for a row of one). Throws Error unless 0 < density − ε and density + ε < 1.
std::vector<double> della_keep_probabilities(const double* x, std::size_t n, double density,
                                             double epsilon, std::size_t row_len = 0);

// Model Stock (Jang et al. 2024, arXiv 2403.19522) as mergekit computes it: with d_k = w_k − w_0
// for N >= 2 fine-tuned models, cos θ the mean pairwise cosine of the d_k (each clamped to
// [−1, 1], norm products to >= 1e-6), t = N·cos θ / (1 + (N − 1)·cos θ), the result is
// t·mean(w_k) + (1 − t)·w_0; per row of `row_len` with filter_wise (mergekit's option), else
// over the whole tensor. In double, one rounding per element. Throws Error for N < 2, a null
// pointer, a non-finite value, or row_len not dividing n.
std::vector<float> model_stock(const float* base, const std::vector<const float*>& models,
                               std::size_t n, std::size_t row_len = 0);

// SLERP as mergekit computes it: both tensors flattened and normalised (eps 1e-8), d = ⟨v̂0, v̂1⟩;
// |d| > 0.9995 falls back to lerp (1 − t)·v0 + t·v1, else
// sin((1 − t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 with θ = arccos d. In double (mergekit uses
// float32), one rounding per element. Throws Error for a non-finite t or value.
std::vector<float> slerp(const float* v0, const float* v1, std::size_t n, double t);

}  // namespace edgefuse
