// Private: the values and plans of `edgefuse simulate` (engine/simulate.h), shared with the
// tests that recompute a simulated round with materialised tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "edgefuse/engine/simulate.h"
#include "src/core/splitmix.h"

namespace edgefuse::detail {

inline constexpr float kSimTargetScale = 0.05f;  // target weights: uniform in [-0.05, 0.05), bf16
inline constexpr float kSimDeltaScale = 0.01f;   // client deltas: uniform in [-0.01, 0.01), f32

// Generator streams (src/kernels/generate.h): target tensor t, and client c's tensor t (its
// values indexed by the client-local row-major element index).
inline std::uint64_t sim_target_key(std::uint64_t seed, std::size_t tensor) {
  return splitmix_at(stream_state(seed, "simulate/target"), tensor);
}
inline std::uint64_t sim_client_key(std::uint64_t seed, std::size_t client, std::size_t tensor) {
  return splitmix_at(splitmix_at(stream_state(seed, "simulate/client"), client), tensor);
}
// The server optimizer's previous state of target tensor t: which = 0 for m, 1 for v.
inline std::uint64_t sim_state_key(std::uint64_t seed, std::size_t tensor, std::size_t which) {
  return splitmix_at(splitmix_at(stream_state(seed, "simulate/state"), tensor), which);
}
// Client c's weight (a sample count): 1, 2, 3, 4, 1, ...
inline float sim_client_weight(std::size_t c) { return static_cast<float>(1 + c % 4); }

// Client c's plan as JSON (rolling windows; see simulate.cc).
std::string sim_client_plan_json(const SimulationShape& shape, std::size_t client,
                                 std::uint64_t round);

}  // namespace edgefuse::detail
