// The `edgefuse demo` job: a Llama-shaped bf16 target, rolling-window client updates, fused
// with the kernels and checked against a scalar recomputation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgefuse::cli {

struct DemoOptions {
  std::string scale = "small";  // "small" (~56M params) or "tiny" (for tests)
  std::size_t clients = 8;
  std::size_t samples = 100000;  // elements recomputed by the scalar check
  std::uint64_t seed = 2026;
};

// Runs the demo, printing its report to stdout. Returns 0 when every sampled element
// matches the scalar recomputation bit for bit, 1 otherwise.
int run_demo(const DemoOptions& options);

}  // namespace edgefuse::cli
