// edgefuse/aggregate/centered_clip.h — centered clipping (Karimireddy, He and Jaggi, "Learning
// from History for Byzantine Robust Optimization", ICML 2021), started from the previous
// aggregate: in delta mode, from Δ = 0.
//
// With the clients' updates x_i (whole-update vectors over every tensor; an element a client
// does not cover counts as 0 in them) and weights p_i = w_i / Σ w, each of L iterations does
//   c_i = min(1, τ / ‖x_i − v‖),  v ← v + Σ_i p_i·c_i·(x_i − v)
// (the paper's rule, 1/k in place of p_i when the weights are equal). v stays a combination
// Σ_j a_j·x_j of the updates, so the iterations need only their Gram matrix ⟨x_i, x_j⟩, summed
// in f64 in one streamed pass: a ← (1 − Σ p_i c_i)·a + p ⊙ c, and
// ‖x_i − v‖² = G_ii − 2·(G a)_i + aᵀ G a. The round then fuses each element as the mean of its
// covering clients weighted by a_j (rounded to f32), times s = Σ_j a_j: with every client
// covering the whole model that is Σ_j a_j·x_j, the paper's v.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace edgefuse {

struct CenteredClipOptions {
  double tau = 1.0;            // the clipping radius τ > 0, finite
  std::size_t iterations = 1;  // L >= 1 (the paper finds 1 enough)
};

// What centered clipping computed, clients in fusion order (sub-model clients as added, then
// low-rank ones).
struct CenteredClipResult {
  std::vector<std::string> labels;
  std::vector<double> coefficients;  // a_j: the aggregate is Σ_j a_j·x_j
  std::vector<double> distances;     // ‖x_i − v‖ in the last iteration
  std::vector<double> factors;       // c_i in the last iteration
};

// Throws Error for a τ that is not > 0 and finite or 0 iterations.
void check_centered_clip_options(const CenteredClipOptions& options);

// The iterations on a k x k Gram matrix (row-major) and weights (any positive scale): the
// coefficients, last distances and factors (labels left empty). Throws Error for a τ that is
// not > 0 and finite, 0 iterations, a Gram matrix of the wrong size, or weights that do not
// sum to a positive finite number.
CenteredClipResult centered_clip_coefficients(const std::vector<double>& gram,
                                              const std::vector<double>& weights,
                                              const CenteredClipOptions& options);

}  // namespace edgefuse
