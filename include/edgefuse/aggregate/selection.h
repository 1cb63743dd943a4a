// edgefuse/aggregate/selection.h — choosing which clients a round fuses from their whole
// updates: Krum, Multi-Krum and Bulyan (Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML
// 2018; Flower's Krum, MultiKrum and Bulyan strategies).
//
// Distances between clients that cover different parts of the model: the distance of clients
// i and j is the mean of (x_i - x_j)^2 over the elements both cover (deltas in delta mode,
// weights in params mode), +inf when they share none. For clients that all cover the whole
// model this is the squared L2 distance divided by the element count, so every distance is
// scaled alike and the choice is Flower's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgefuse {

// Whole-update statistics of a round's clients, summed in f64 over every tensor (one streamed
// pass over their values; bitwise the same for any tile size and thread count).
struct ClientStatistics {
  std::vector<std::string> labels;         // the clients, in fusion order
  std::vector<double> sum_squares;         // per client: sum of its values squared
  std::vector<double> pair_squares;        // k x k: sum of (x_i - x_j)^2 where both cover
  std::vector<std::uint64_t> pair_common;  // k x k: elements both cover
  std::vector<double> pair_dots;           // k x k when asked for: sum of x_i·x_j where both cover
                                           // (the diagonal: sum_squares)
  std::size_t size() const noexcept { return labels.size(); }
  // The distance above; 0 for i == j.
  double distance(std::size_t i, std::size_t j) const noexcept;
};

// kMultiKrum: the m clients of lowest Krum score, fused by the round's weighted mean (m = 1 is
// Krum). kBulyan: the k - 2f clients of lowest score, then per element the mean of the
// max(1, c - 2f) values closest to the median of the c selected clients that cover it
// (unweighted).
enum class SelectionRule : std::uint8_t { kMultiKrum, kBulyan };

struct ClientSelection {
  SelectionRule rule = SelectionRule::kMultiKrum;
  std::size_t f = 0;  // clients assumed Byzantine
  std::size_t m = 1;  // kMultiKrum: clients selected, in [1, k]
};

struct SelectionResult {
  std::vector<double> scores;         // per client: sum of its k - f - 2 (at least 1) smallest
                                      // distances to the others
  std::vector<std::size_t> selected;  // client indices, lowest score first (ties: lower index)
};

// The memory the statistics pass holds while it runs, beyond the clients' own data: each
// thread's tile of every client's values and the tiles' sums before they are added in order
// (at most 64 MiB). For a memory budget.
std::uint64_t client_statistics_bytes(std::size_t clients, std::size_t threads) noexcept;

// Scores and selects. Throws Error when k < 2f + 3 (kMultiKrum) or k < 4f + 3 (kBulyan), or
// m is outside [1, k], naming the numbers.
SelectionResult select_clients(const ClientStatistics& statistics, const ClientSelection& rule);

}  // namespace edgefuse
