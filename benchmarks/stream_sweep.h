// Shared by the benchmark binaries of streaming kernels (kernels_bench, server_bench): each
// benchmark takes (threads, n) with the element count n last, swept from cache-sized to
// DRAM-sized, and reports its bytes per element against the triad. Include after
// <torch/torch.h> when EDGEFUSE_BENCH_WITH_TORCH is set, so LibTorch gets the thread count too.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>

#include "benchmarks/bench_common.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/target.h"

namespace edgefuse::bench {

// The benchmark's thread count for edgefuse (and LibTorch).
inline void use_threads(const benchmark::State& state) {
  const int t = static_cast<int>(state.range(0));
  set_num_threads(static_cast<std::size_t>(t));
#if defined(EDGEFUSE_BENCH_WITH_TORCH)
  torch::set_num_threads(t);
#endif
}

// The counters of bench_common.h for n = range(1) elements moving bytes_per_param each, and the
// SIMD target as the label.
inline void report_per_param(benchmark::State& state, double bytes_per_param) {
  const double n = static_cast<double>(state.range(1));
  report(state, bytes_per_param * n, n, static_cast<int>(state.range(0)));
  state.SetLabel(simd_target_name());
}

// Sizes: 4 Ki (L1), 256 Ki (L2/L3) and a DRAM size moving >= 1 GiB per iteration.
inline void sizes_for(benchmark::internal::Benchmark* b, double bytes_per_param) {
  std::int64_t dram = std::int64_t{1} << 20;
  while (static_cast<double>(dram) * bytes_per_param < 1.1 * (1 << 30)) dram *= 2;
  for (int t : thread_counts()) {
    for (std::int64_t n : {std::int64_t{4096}, std::int64_t{1} << 18, dram}) b->Args({t, n});
  }
  b->ArgNames({"threads", "n"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace edgefuse::bench

#define EDGEFUSE_BENCH(fn, bytes) \
  BENCHMARK(fn)->Apply(           \
      [](benchmark::internal::Benchmark* b) { edgefuse::bench::sizes_for(b, bytes); })
