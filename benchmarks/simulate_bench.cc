// How a whole fusion round grows with the target's size: `edgefuse simulate` (engine/simulate.h)
// at 1B, 10B and 100B target parameters, every fused tensor hashed by XXH3 as the CLI does.
//
// Clients: 1/1000 of the target each where the budget chooser's granularity allows it (one
// KV group of width, whole layers, the full vocabulary), else its smallest sub-model; and as
// many clients (at most 1000) as make the round's client values about the target's size, so
// the work per target parameter is the same at every size and linear time is the goal.
//
// Counters: roofline = (target read + fused written + client updates read, all bf16) / s over
// the triad at the same thread count; params_per_second = target parameters fused per second;
// client_values = values of all client sub-models.
//
// Flags (before Google Benchmark's own): --sim_scale=full (default: 1B, 10B, 100B; about 3
// minutes on 2 cores, 0.2 GiB of RAM) or --sim_scale=small (10M, for smoke tests).
#include <xxhash.h>

#include <cmath>
#include <memory>

#include "benchmarks/bench_common.h"
#include "edgefuse/engine/simulate.h"

namespace ef = edgefuse;

namespace {

ef::SimulationOptions options_for(double target) {
  ef::SimulationOptions o;
  o.target_params = target;
  const ef::ModelConfig c = ef::llama_config_for(target);
  const std::uint64_t kv = c.kv_heads ? c.kv_heads : c.heads;
  const double smallest = static_cast<double>(ef::submodel_params(c, ef::Rational{1, kv}, 1));
  o.client_params = std::max(target / 1000.0, smallest);
  o.clients =
      static_cast<std::size_t>(std::clamp(std::round(target / o.client_params), 1.0, 1000.0));
  return o;
}

void BM_SimulateRound(benchmark::State& state) {
  const double target = static_cast<double>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  ef::SimulationOptions o = options_for(target);
  o.threads = static_cast<std::size_t>(threads);
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> h(XXH3_createState(), &XXH3_freeState);
  ef::SimulationReport r;
  for (auto _ : state) {
    XXH3_64bits_reset(h.get());
    r = ef::run_simulation(o, [&](std::size_t, const std::string&, const std::byte* p,
                                  std::size_t n) { XXH3_64bits_update(h.get(), p, n); });
    state.SetIterationTime(r.seconds);  // the round; setup (plans, triad) is reported apart
  }
  ef::bench::report(state, static_cast<double>(r.bytes_moved),
                    static_cast<double>(r.shape.target_params), threads);
  state.counters["clients"] = static_cast<double>(o.clients);
  state.counters["client_values"] = static_cast<double>(r.client_values);
  state.counters["setup_s"] = r.setup_seconds;
  state.counters["peak_rss_GiB"] = static_cast<double>(r.peak_rss_bytes) / (1u << 30);
  state.counters["checksum_lo32"] = static_cast<double>(XXH3_64bits_digest(h.get()) & 0xffffffffu);
}

void build(bool small) {
  const std::vector<std::int64_t> sizes =
      small ? std::vector<std::int64_t>{10'000'000}
            : std::vector<std::int64_t>{1'000'000'000, 10'000'000'000, 100'000'000'000};
  for (const std::int64_t n : sizes) {
    for (int t : ef::bench::thread_counts()) {
      benchmark::RegisterBenchmark("BM_SimulateRound", BM_SimulateRound)
          ->Args({n, t})
          ->ArgNames({"target", "threads"})
          ->Iterations(1)
          ->UseManualTime()
          ->Unit(benchmark::kSecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv, "sim_scale", build); }
