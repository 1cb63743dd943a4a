// edgefuse/lora/combine.h — combining N LoRA adapters into one, as PEFT's
// `add_weighted_adapter` does, plus mergekit's TIES/DARE variants and an exact factored SVD.
//
// PEFT (huggingface/peft tuners/lora/model.py): `cat` stacks the factors (exact:
// ΔW = Σ w_k·s_k·B_k·A_k); `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`
// merge the A list with weights sgn(w_k·s_k)·√|w_k·s_k| and the B list with √|w_k·s_k|
// separately (cross terms: not a product average); the `*_svd` types merge the dense deltas
// D_k = s_k·B_k·A_k with weights w_k·s_k — so their target is Σ w_k·s_k²·B_k·A_k, as PEFT's
// code computes it — and truncate an SVD to `svd_rank` (B' = U·S, A' = Vᴴ,
// optional quantile clamp). `svd` itself (task arithmetic, no pruning) is computed without the
// dense matrix: QR of the stacked factors and the SVD of the small core.
// The result has scaling 1 and is saved with use_rslora off.
//
//   auto merged = edgefuse::combine_adapters({&a1, &a2}, {0.25, 0.75},
//                                            {.type = edgefuse::CombinationType::kCat});
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/task_merge.h"

namespace edgefuse {

enum class CombinationType {
  kCat,
  kLinear,
  kSvd,
  kTies,
  kTiesSvd,
  kDareLinear,
  kDareTies,
  kDareLinearSvd,
  kDareTiesSvd,
  kMagnitudePrune,
  kMagnitudePruneSvd,
  // mergekit's semantics on the dense deltas (weighted election, weight-sum normalisation, L1
  // DARE rescale), then the truncated SVD: "mergekit_ties_svd" ...
  kMergekitTiesSvd,
  kMergekitDareLinearSvd,
  kMergekitDareTiesSvd,
};

// PEFT's names ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
// "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd") and
// "mergekit_ties_svd", "mergekit_dare_linear_svd", "mergekit_dare_ties_svd".
CombinationType parse_combination_type(std::string_view name);
const char* combination_type_name(CombinationType t);
bool is_svd_type(CombinationType t);

struct CombineOptions {
  CombinationType type = CombinationType::kCat;
  double density = 1.0;  // pruning types: kept fraction in (0, 1]
  MajoritySign majority_sign = MajoritySign::kTotal;
  std::optional<std::uint64_t> svd_rank;  // default: the largest input rank
  std::optional<double> svd_clamp;        // quantile q in (0, 1]
  std::uint64_t seed = 0;                 // DARE masks (stream key: module and factor)
  // *_svd types: true = PEFT's target Σ w_k·s_k²·B_k·A_k; false = Σ w_k·s_k·B_k·A_k (what a
  // federated average wants).
  bool peft_svd_scaling = true;
};

// Combines `adapters` with `weights` module by module (a module takes part from the adapters
// that have it, as in PEFT). Throws Error naming the adapter label and module for: an empty
// list, weights.size() mismatch or non-finite weights, an unknown type, density outside (0, 1],
// modules whose in/out features or kind disagree, unequal ranks for the factor-wise types,
// svd_rank of 0, svd_clamp outside (0, 1].
LoraAdapter combine_adapters(const std::vector<const LoraAdapter*>& adapters,
                             const std::vector<double>& weights, const CombineOptions& options);

// Truncated SVD of Σ_k c_k·B_k·A_k (B_k: out×r_k, A_k: r_k×in, all F32) without the dense
// out×in matrix: QR of [c_1·B_1 | …] and of [A_1; …]ᵀ (on two threads), the
// R×R core R_B·R_Aᵀ (R = Σ r_k), its k = min(rank, R, out, in) leading singular triplets,
// rotated back. When k is small beside R (16·k <= R, core square) only those triplets are
// computed, as LAPACK's dgesvdx does (bidiagonalisation, bisection and inverse iteration on the
// Golub-Kahan matrix; each vector checked, with the full SVD as the fallback), else Eigen's
// BDCSVD of the whole core. O((out + in)·R² + R³) time, no out×in temporary, double precision.
// Runs the copy compiled for the widest instruction set of the CPU (baseline x86-64, AVX2+FMA
// or AVX-512). The copies round differently (FMA in Eigen's AVX kernels), so f32 outputs can
// differ in the last bits between CPUs; each copy is tested against a dense Jacobi SVD (σ within
// 1e-10·σ_1) and is bitwise identical at every thread count.
// Throws Error for: empty or unequal lists, null or non-F32 factors, a NaN or Inf in a factor
// (named with its pair and [row, column]), shapes that do not chain
// (B_k out×r_k, A_k r_k×in, r_k >= 1), a non-finite coefficient, rank 0.
struct LowRankSvd {
  std::vector<double> sigma;  // the k leading singular values, descending
  Tensor us;                  // F32 (out, k): U_k·diag(σ_k)
  Tensor vt;                  // F32 (k, in): V_kᵀ
  bool partial = false;       // only the k leading triplets were computed (see above)
};
LowRankSvd factored_svd(const std::vector<const Tensor*>& bs, const std::vector<const Tensor*>& as,
                        const std::vector<double>& coefficients, std::uint64_t rank);

namespace detail {
// For tests and benchmarks: the instruction sets factored_svd has a copy for that this CPU
// runs, "baseline" first and the widest ("avx2", "avx512") last.
std::vector<std::string> factored_svd_isas();
// factored_svd on the copy for `isa`, one of factored_svd_isas(); throws Error otherwise.
LowRankSvd factored_svd_on(std::string_view isa, const std::vector<const Tensor*>& bs,
                           const std::vector<const Tensor*>& as,
                           const std::vector<double>& coefficients, std::uint64_t rank);
}  // namespace detail

}  // namespace edgefuse
