// edgefuse/engine/simulate.h — a whole fusion round at any scale, with generated tensors.
//
// `edgefuse simulate --target-params 100e9 --client-params 100e6 --clients 1000` runs the
// engine's aggregation (aggregate/aggregator.h: coverage-weighted mean, fp32 sums, one rounding)
// over a Llama-shaped bf16 target sized to the parameter count, and over that many clients,
// each holding a sub-model that the budget chooser (plan/policies.h choose_budget) sizes to
// the client parameter count by width and depth, placed by FedRolex-style rolling windows
// (policy "rolling") staggered across clients: layer windows first, then hidden windows, then
// KV-group and MLP windows, so the round covers different blocks before any block twice.
//
// Nothing is read from disk: every target value and every client delta is generated from a
// counter-based hash of (seed, tensor or client, element index), so any tile of any tensor
// can be made on its own, on any thread, with the same bits. The fused tensors go to a sink,
// in order (the CLI hashes them with XXH3). Memory stays within the budget whatever the
// size: one chunk of target rows, its fused copy and the per-thread tiles.
//
// With a robust aggregate (median, trimmed mean) or a server optimizer, the round runs them as
// `edgefuse fuse` does (aggregate/options.h). The optimizer's previous state is generated like
// the target (m uniform in ±1e-3, v uniform in [0, 1e-6], per element), stepped chunk by chunk
// and handed to the sink after each model piece, as pieces named "<tensor>.m" and "<tensor>.v".
//
// A verify mode recomputes sampled rows with a scalar reference (the same generator, the
// plan's index maps, and the f32 arithmetic of the scatter and finalize kernels written out
// element by element) and fails on the first bit that differs.
//
//   edgefuse::SimulationOptions o;
//   o.target_params = 1e9; o.client_params = 1e6; o.clients = 1000;
//   auto r = edgefuse::run_simulation(o, [&](std::size_t, const std::string&, const std::byte* p,
//                                            std::size_t n) { /* hash p[0..n) */ });
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "edgefuse/aggregate/options.h"
#include "edgefuse/plan/policies.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse {

struct SimulationOptions {
  double target_params = 1e9;  // the target's size (parameters); the shape is chosen to match
  double client_params = 1e6;  // each client's sub-model budget (parameters)
  std::size_t clients = 100;
  std::uint64_t seed = 1;
  std::uint64_t round = 0;  // the FedRolex round of the windows
  float server_lr = 1.0f;   // delta mode
  std::uint64_t memory_budget = std::uint64_t{2} << 30;
  std::size_t threads = 0;                // 0: every core
  std::size_t verify_rows = 0;            // rows recomputed by the scalar reference (0: none)
  std::optional<RobustAggregate> robust;  // none: the weighted mean
  std::optional<ServerStep> server;       // none: W + server_lr · mean (delta mode either way)
};

// A Llama-shaped config of about `params` parameters: hidden sizes from 64 to 16384, head_dim
// 128 (smaller for small models), up to 8 KV heads, intermediate 3.5 x hidden (a multiple of
// 256, as Llama 3), a vocabulary of 32000 (less when embeddings would exceed an eighth of the
// model). Among the shapes within 1% of `params` (the nearest when none is, below about 10^8)
// the one closest to 110 hidden units per layer (the aspect of Llama 3's 8B and 70B models).
// Throws Error outside [10^5, 10^13] parameters.
ModelConfig llama_config_for(double params);

struct SimulationShape {
  ModelConfig target;
  std::uint64_t target_params = 0;
  std::size_t tensors = 0;
  BudgetChoice client;  // width, layers and exact parameters of every client's sub-model
};
// What run_simulation would run (no work): the chosen target and client shapes.
SimulationShape simulation_shape(const SimulationOptions& options);

struct SimulationProgress {
  std::size_t tensors_done = 0, tensors_total = 0;
  std::uint64_t params_done = 0, params_total = 0;
  double seconds = 0.0;
};

struct SimulationReport {
  SimulationShape shape;
  std::size_t clients = 0;
  double setup_seconds = 0.0;  // plans, client registration, triad
  double seconds = 0.0;        // the round itself (every tensor through the sink)
  // What a real round over bf16 files moves: the target read, the fused target written and
  // every client's update read (bf16), and the server optimizer's f32 state read and written,
  // in bytes.
  std::uint64_t bytes_moved = 0;
  std::uint64_t client_values = 0;  // generated client values (sum of sub-model sizes)
  std::uint64_t covered = 0;        // target elements at least one client covers
  double triad_bytes_per_second = 0.0;
  std::size_t threads = 0;
  std::size_t tile_elements = 0;
  std::uint64_t chunk_elements = 0;  // target rows made at a time
  std::uint64_t memory_budget = 0;
  std::uint64_t client_state_bytes = 0;  // Aggregator::resident_bytes, counted in the budget
  std::uint64_t peak_rss_bytes = 0;      // the process's high-water mark (VmHWM), 0 if unknown
  std::size_t verified_rows = 0;
  double params_per_second() const noexcept {
    return seconds > 0 ? static_cast<double>(shape.target_params) / seconds : 0.0;
  }
  double bytes_per_second() const noexcept {
    return seconds > 0 ? static_cast<double>(bytes_moved) / seconds : 0.0;
  }
  double triad_fraction() const noexcept {
    return triad_bytes_per_second > 0 ? bytes_per_second() / triad_bytes_per_second : 0.0;
  }
};

// Receives the fused tensors in layout order, each as consecutive pieces of its bytes
// (bf16, row-major), from one thread.
using SimulationSink = std::function<void(std::size_t tensor, const std::string& name,
                                          const std::byte* data, std::size_t bytes)>;

// Runs the round. Throws Error for options out of range (fewer than 1 client, a client budget
// the chooser cannot meet, a memory budget below one chunk and the tiles, verify together with
// a robust aggregate or a server optimizer: its reference is the weighted mean's) and, in
// verify mode, for a row whose bits differ from the scalar reference (naming tensor, row and
// column).
SimulationReport run_simulation(
    const SimulationOptions& options, const SimulationSink& sink,
    const std::function<void(const SimulationProgress&)>& progress = {});

}  // namespace edgefuse
