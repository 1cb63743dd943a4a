// `edgefuse-lab demo`: federated learning of a character-level Llama over heterogeneous clients,
// fused each round by the engine (engine/fuse.h). Built when LibTorch is found.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgefuse::lab {

struct FlDemoOptions {
  std::string out = "demo-run";  // round folders, bits-per-char table and plot
  std::string fortunes = "/usr/share/games/fortunes";
  int rounds = 20;
  int local_steps = 25;  // optimizer steps per client per round
  std::uint64_t seed = 7;
  bool quick = false;  // 3 rounds of 5 steps: a smoke run for tests
};

// Runs FedRolex, HeteroFL and largest-tier-only; prints held-out bits per character by round
// and writes <out>/bpc.tsv and <out>/bpc.png (the plot needs gnuplot). Returns 0.
int run_fl_demo(const FlDemoOptions& options);

}  // namespace edgefuse::lab
