// edgefuse/plan/policies.h — how each method picks a client's indices along one axis.
//
// Every width/depth method is an index-list generator over an axis of N
// indices: HeteroFL (Diao et al., ICLR 2021) and FjORD (Horvath et al., NeurIPS 2021) take a
// prefix; FedRolex (Alam et al., NeurIPS 2022) a cyclic window that moves one index per round,
// in the paper's forward direction or the official code's backward one; Federated
// Dropout (Caldas et al. 2018) a random subset; depth methods a prefix (DepthFL), a uniform
// stride keeping the first and last layer (Offsite-Tuning) or a rolling window. Sizes are
// k = ceil(N * rate) in exact rational arithmetic: in doubles ceil(100 * 0.07) is 8, here 7.
// The budget chooser picks width and depth ratios that fit a parameter budget (a 1000x gap
// needs both).
//
//   auto r = edgefuse::Rational::parse("0.07");        // 7/100
//   auto idx = edgefuse::rolling_window(6, r, 3);       // FedRolex paper-style, round 3
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace edgefuse {

struct ModelConfig;

// A rate num/den in (0, 1], kept exact.
struct Rational {
  std::uint64_t num = 1;
  std::uint64_t den = 1;
  // "7/100", "0.07", "1", "1e-2": decimals are read exactly (0.07 is 7/100, not the double).
  // Throws Error unless the value is in (0, 1].
  static Rational parse(std::string_view text);
  // The shortest decimal that round-trips to `x` (what a JSON writer printed), exactly.
  static Rational from_double(double x);
  // ceil(n * num / den) in integer arithmetic, at least 1.
  std::uint64_t count(std::uint64_t n) const noexcept;
  std::string to_string() const;  // "7/100"
};

// [0, k) with k = rate.count(n): HeteroFL / FjORD / DepthFL prefix.
std::vector<std::uint32_t> prefix_indices(std::uint64_t n, Rational rate);

enum class RollingConvention {
  kForward,   // the FedRolex paper: start = (round + offset) mod n, then start+1, ... mod n
  kBackward,  // the FedRolex code: the first k of roll(arange(n), round + offset)
};
// A cyclic window of k = rate.count(n) indices in client-local (window) order.
std::vector<std::uint32_t> rolling_window(
    std::uint64_t n, Rational rate, std::uint64_t round,
    RollingConvention convention = RollingConvention::kForward, std::uint64_t offset = 0);

// k = rate.count(n) distinct indices drawn uniformly with a SplitMix64 stream seeded by
// (seed, stream_key) and a partial Fisher-Yates shuffle with unbiased bounded draws (Lemire),
// returned sorted. The same arguments give the same list on every platform.
std::vector<std::uint32_t> random_indices(std::uint64_t n, Rational rate, std::uint64_t seed,
                                          std::string_view stream_key = {});

// k = rate.count(n) indices spread evenly over [0, n): round(i * (n-1) / (k-1)), so the first
// and last are always kept (k = 1 keeps index 0). Offsite-Tuning's layer drop.
std::vector<std::uint32_t> stride_indices(std::uint64_t n, Rational rate);

// FIARSE's importance mask (Wu et al., NeurIPS 2024): the k = floor(n *
// size) indices of largest |w| (ties: the lower index first), sorted. An explicit plan list for
// a flattened axis; with delta-mode aggregation and server_lr = -lr_global on Δ = start - end
// it reproduces FIARSE's update. Throws Error for k = 0 or a non-finite value.
std::vector<std::uint32_t> top_magnitude_indices(const float* w, std::size_t n, Rational size);

// Offsets for a round's rolling windows so their union covers the most: client c's window
// starts right after client c-1's (offset_c = k_0 + ... + k_{c-1} mod n), so the union has
// min(n, sum k_c) indices, where FedRolex's shared start gives only max k_c.
std::vector<std::uint64_t> stagger_offsets(std::uint64_t n, const std::vector<Rational>& rates);

// A width and depth choice for a Llama-style target.
struct BudgetChoice {
  Rational width;            // applied to hidden, kv groups (whole groups) and MLP width
  std::uint64_t layers = 0;  // layers kept
  std::uint64_t hidden = 0, heads = 0, kv_heads = 0, intermediate = 0;
  std::uint64_t params = 0;  // exact parameter count of the sub-model, embeddings included
};
// Exact parameter count of the sub-model of `config` (llama preset tensors; lm_head counted
// unless tied) with the width applied as the plan would: kv groups ceil(G*w) whole groups,
// hidden ceil(d*w), MLP ceil(F*w), and `layers` layers.
std::uint64_t submodel_params(const ModelConfig& config, Rational width, std::uint64_t layers);
// Picks width = j / G (whole KV groups, j = 1..G) and a layer count whose sub-model fits
// `budget_params`: the largest sub-model, and among those within 5% of it the one whose width
// and depth ratios are closest on a log scale (both cut, neither to the bone). Throws Error if
// even one group of one layer exceeds the budget.
BudgetChoice choose_budget(const ModelConfig& config, std::uint64_t budget_params);

}  // namespace edgefuse
