// Shared by every benchmark binary: the STREAM-style triad measured in the same process at
// each thread count, and the counters every result reports against it:
//   bytes_per_second   SetBytesProcessed with the bytes the operation must move
//   roofline           those bytes/s divided by the triad's bytes/s at the same thread count
//   params_per_second  elements (parameters) processed per second
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/triad.h"

namespace edgefuse::bench {

inline std::map<int, double>& triads() {
  static std::map<int, double> t;  // threads -> bytes/s
  return t;
}

inline std::vector<int> thread_counts() {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return hw > 1 ? std::vector<int>{1, hw} : std::vector<int>{1};
}

// Measures the triad at every thread count of thread_counts() and prints it to stderr.
inline void measure_triads() {
  for (int t : thread_counts()) {
    set_num_threads(static_cast<std::size_t>(t));
    triads()[t] = measure_triad_bytes_per_second(std::size_t{1} << 25, 5);
    std::fprintf(stderr, "STREAM triad, %d thread(s): %.2f GB/s\n", t, triads()[t] / 1e9);
  }
}

// Sets the three counters for `bytes` moved and `params` processed per iteration, relative to
// the triad at `threads`.
inline void report(benchmark::State& state, double bytes, double params, int threads) {
  const double iters = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * iters));
  state.counters["roofline"] =
      benchmark::Counter(bytes * iters / triads().at(threads), benchmark::Counter::kIsRate);
  state.counters["params_per_second"] =
      benchmark::Counter(params * iters, benchmark::Counter::kIsRate);
}

// The main() of a benchmark binary without a scale flag: the triads, then the benchmarks.
inline int run_main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  measure_triads();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

// The main() of a benchmark binary with a scale flag: `--<flag>=full` (default) or
// `--<flag>=small` is consumed before Google Benchmark's own flags; then the triads are
// measured, build(small) sets up the inputs and the benchmarks run. Returns the exit status.
inline int run_main(int argc, char** argv, const std::string& flag, void (*build)(bool small)) {
  std::vector<char*> rest = {argv[0]};
  bool small = false;
  const std::string prefix = "--" + flag + "=";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == prefix + "small") {
      small = true;
    } else if (a == prefix + "full") {
      small = false;
    } else if (a.rfind(prefix, 0) == 0) {
      std::fprintf(stderr, "%s: --%s must be full or small\n", argv[0], flag.c_str());
      return 2;
    } else {
      rest.push_back(argv[i]);
    }
  }
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;
  measure_triads();
  build(small);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace edgefuse::bench
