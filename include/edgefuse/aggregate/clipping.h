// edgefuse/aggregate/clipping.h — norm clipping of the clients' updates and DP-FedAvg's
// Gaussian noise (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
// NeurIPS 2021; McMahan et al., ICLR 2018).
//
// Each client's update Δ_i (its deltas over every tensor it covers, LoRA products included) is
// scaled by min(1, C / ‖Δ_i‖), ‖·‖ the L2 norm summed in f64 over all of them. The round then
// fuses the scaled updates by its rule, and with a noise multiplier z each covered element of
// the fused mean gets N(0, (z·C/m)²), m the number of clients covering that element (the
// round's client count when every client holds the whole model). The noise is keyed by (seed,
// round, tensor, element), so it is the same for any tile size and thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgefuse {

struct ClipOptions {
  double norm = 1.0;              // C > 0, finite
  double noise_multiplier = 0.0;  // z >= 0, finite; 0: no noise
  std::uint64_t seed = 0;         // the noise's key (keep it secret)
  std::uint64_t round = 0;        // the noise's round
};

// What clipping did, clients in fusion order (sub-model clients as added, then low-rank ones).
struct ClipResult {
  std::vector<std::string> labels;  // the clients
  std::vector<double> norms;        // ‖Δ_i‖ before clipping
  std::vector<float> factors;       // min(1, C / ‖Δ_i‖) in f32
  std::size_t unclipped = 0;        // clients with ‖Δ_i‖ <= C (factor 1)
};

// Adaptive clipping's norm for the next round (Andrew et al. 2021, with geometric updates):
// C · exp(-lr · (b - quantile)), b the fraction of the round's clients left unclipped (plus
// the caller's noise on that fraction, if any). Throws Error for a norm that is not > 0 and
// finite or a fraction that is not finite.
double adaptive_clip_norm(double norm, double lr, double quantile, double unclipped_fraction);

// The standard normal draw of element `element` of tensor `tensor` in round `round`: Philox4x32-10
// (Random123) keyed by `seed` on the counter (element / 2, tensor, round), its output as two
// 64-bit words through Box-Muller (Random123's boxmuller); the first draw for even elements,
// the second for odd ones.
double dp_standard_normal(std::uint64_t seed, std::uint64_t round, std::uint32_t tensor,
                          std::uint64_t element) noexcept;

}  // namespace edgefuse
