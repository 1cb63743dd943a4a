// Coverage aggregation at the 100x scale gap: 64 clients with ~10M-parameter rolling-window
// plans (FedRolex, staggered so a round covers the most) into a TinyLlama-shaped 1.1B-parameter
// bf16 target, in memory. BM_AggregateEdgefuse is the tiled Aggregator; BM_AggregateTorch is
// the way HeteroFL's and FedRolex's `combine` do it, in LibTorch: per tensor an f32 sum and
// an f32 count of the target's shape, advanced-index accumulation of every client's block
// (index_put_ with accumulate), then sum/count where count > 0.
//
// Bytes counted per iteration (what the operation must move at least): the target read, the
// result written (bf16 each) and every client update read once (bf16).
//
// Arguments: threads; counts (1 = per-element contributor counts for the coverage report);
// fused_check: 0 = FiniteCheck::kOnAdd (add() scans each update for NaN/Inf, so updates are
// read twice), 1 = FiniteCheck::kWhileFusing (finalize checks the sums it divides, so each
// update is read once; the same result and the same rejections).
//
// Flags (before Google Benchmark's own): --agg_scale=full (default, 1.1B target, ~6 GB of
// RAM) or --agg_scale=small (a 4-layer 256-wide model, 8 clients; for smoke tests).
//   ./aggregate_bench --benchmark_filter=Edgefuse
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "benchmarks/bench_common.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/plan/policies.h"

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include "edgefuse/interop/torch.h"
#endif

namespace ef = edgefuse;

namespace {

struct Setup {
  ef::ModelConfig cfg;
  std::size_t clients = 64;
  std::vector<ef::NamedTensor> target;
  std::unique_ptr<ef::ModelLayout> layout;
  std::vector<ef::Plan> plans;
  std::vector<std::vector<ef::NamedTensor>> updates;
  double target_params = 0, client_params = 0;
};
Setup* g = nullptr;

std::vector<std::uint32_t> window(std::uint64_t n, ef::Rational r, std::uint64_t offset) {
  return ef::rolling_window(n, r, 0, ef::RollingConvention::kForward, offset);
}

void build(bool small) {
  g = new Setup;
  auto& c = g->cfg;
  if (small) {
    c.hidden = 256;
    c.heads = 8;
    c.kv_heads = 4;
    c.head_dim = 32;
    c.intermediate = 704;
    c.layers = 4;
    c.vocab = 4000;
    g->clients = 8;
  } else {  // TinyLlama-1.1B
    c.hidden = 2048;
    c.heads = 32;
    c.kv_heads = 4;
    c.head_dim = 64;
    c.intermediate = 5632;
    c.layers = 22;
    c.vocab = 32000;
  }
  const ef::Schema s = ef::Schema::preset("llama", c);
  const auto metas = ef::llama_tensor_metas(c, ef::DType::kBF16);
  g->layout = std::make_unique<ef::ModelLayout>(s.bind(metas));
  for (const auto& m : metas) {
    ef::Tensor t = ef::Tensor::empty(m.dtype, m.shape);
    auto* p = t.view().data_as<ef::BFloat16>();
    ef::parallel_for(m.shape.numel(), 1 << 20, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u;
        p[i].bits = static_cast<std::uint16_t>(0x3C00 | ((h >> 16) & 0x3FF));  // ~[0.0078, 0.0156)
      }
    });
    g->target_params += static_cast<double>(m.shape.numel());
    g->target.push_back({m.name, std::move(t)});
  }
  // Each client: 1/8 of hidden, MLP and vocabulary, one KV group of four, 10 of 22 layers;
  // windows staggered client by client so the round covers as much as it can.
  const ef::Rational w{1, 8}, kvr{1, 4}, lr{10, 22};
  for (std::size_t k = 0; k < g->clients; ++k) {
    ef::Plan p;
    p.axes["hidden"] = window(c.hidden, w, k * w.count(c.hidden));
    p.axes["mlp"] = window(c.intermediate, w, k * w.count(c.intermediate));
    p.axes["vocab"] = window(c.vocab, w, k * w.count(c.vocab));
    p.axes["kv_heads"] = window(c.kv_heads, kvr, k);
    std::vector<std::uint32_t> heads;
    for (auto grp : p.axes["kv_heads"]) {
      for (std::uint64_t t = 0; t < c.heads / c.kv_heads; ++t) {
        heads.push_back(static_cast<std::uint32_t>(grp * (c.heads / c.kv_heads) + t));
      }
    }
    p.axes["heads"] = heads;
    auto layers = window(c.layers, lr, k * lr.count(c.layers));
    std::sort(layers.begin(), layers.end());
    p.axes["layers"] = layers;
    ef::validate_plan(p, *g->layout, "bench plan");
    g->updates.push_back(ef::extract(ef::views_of(g->target), *g->layout, p));
    for (const auto& t : g->updates.back())
      g->client_params += static_cast<double>(t.tensor.numel());
    g->plans.push_back(std::move(p));
  }
  std::fprintf(stderr, "target %.3fB params, %zu clients, %.2fM params per client\n",
               g->target_params / 1e9, g->clients, g->client_params / g->clients / 1e6);
}

std::vector<std::int64_t> threads_arg() {
  std::vector<std::int64_t> t;
  for (int x : ef::bench::thread_counts()) t.push_back(x);
  return t;
}

double bytes_moved() { return 2 * 2 * g->target_params + 2 * g->client_params; }

void BM_AggregateEdgefuse(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  ef::set_num_threads(static_cast<std::size_t>(threads));
  std::vector<ef::NamedTensor> out;
  std::vector<ef::TensorView> views;
  for (const auto& t : g->target) {
    // zeros(): the output's pages exist before timing, as a real target buffer's would.
    out.push_back({t.name, ef::Tensor::zeros(t.tensor.dtype(), t.tensor.shape())});
    views.push_back(out.back().tensor.view());
  }
  ef::AggregateOptions opt;
  opt.coverage_counts = state.range(1) != 0;
  opt.finite_check = state.range(2) != 0 ? ef::FiniteCheck::kWhileFusing : ef::FiniteCheck::kOnAdd;
  for (auto _ : state) {
    ef::Aggregator agg(*g->layout, opt);
    for (std::size_t k = 0; k < g->clients; ++k) {
      agg.add(ef::views_of(g->updates[k]), g->plans[k], 1.0f, "client");
    }
    const auto report = agg.finalize(ef::views_of(g->target), views);
    benchmark::DoNotOptimize(report.data());
  }
  ef::bench::report(state, bytes_moved(), g->target_params, threads);
}
BENCHMARK(BM_AggregateEdgefuse)
    ->ArgsProduct({threads_arg(), {0, 1}, {0, 1}})
    ->ArgNames({"threads", "counts", "fused_check"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
void BM_AggregateTorch(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  at::set_num_threads(threads);
  ef::set_num_threads(static_cast<std::size_t>(threads));
  // Per client and tensor: the target indices of each dimension (what HeteroFL keeps in
  // param_idx), made outside the timed loop as the reference code does.
  std::vector<std::vector<std::vector<torch::Tensor>>> idx(g->clients);
  std::vector<std::vector<int>> local_of(g->clients);
  for (std::size_t k = 0; k < g->clients; ++k) {
    const auto cts = ef::client_tensors(*g->layout, g->plans[k]);
    local_of[k].assign(g->target.size(), -1);
    idx[k].resize(g->target.size());
    for (std::size_t j = 0; j < cts.size(); ++j) {
      const auto& ct = cts[j];
      local_of[k][ct.target_index] = static_cast<int>(j);
      // Each dimension's target indices, from the plan's axis lists (groups expanded).
      const auto& t = g->layout->tensors()[ct.target_index];
      const auto& rule = g->layout->rule_of(t);
      for (std::size_t d = 0; d < rule.dims.size(); ++d) {
        const auto& b = rule.dims[d];
        std::vector<std::int64_t> e;
        if (b.axis < 0) {
          for (std::uint64_t i = 0; i < t.meta.shape[static_cast<int>(d)]; ++i)
            e.push_back(static_cast<std::int64_t>(i));
        } else {
          const auto& ax = g->layout->axes()[static_cast<std::size_t>(b.axis)];
          for (auto i : ef::axis_indices(g->plans[k], *g->layout, b.axis)) {
            for (std::uint64_t q = 0; q < ax.group; ++q)
              e.push_back(static_cast<std::int64_t>(i * ax.group + q));
          }
        }
        idx[k][ct.target_index].push_back(torch::tensor(e, torch::kLong));
      }
    }
  }
  for (auto _ : state) {
    for (std::size_t ti = 0; ti < g->target.size(); ++ti) {
      const torch::Tensor base = ef::as_torch(const_cast<ef::Tensor&>(g->target[ti].tensor).view());
      torch::Tensor sum = torch::zeros(base.sizes(), torch::kFloat);
      torch::Tensor count = torch::zeros(base.sizes(), torch::kFloat);
      for (std::size_t k = 0; k < g->clients; ++k) {
        const int j = local_of[k][ti];
        if (j < 0) continue;
        const auto& ix = idx[k][ti];
        torch::Tensor local =
            ef::as_torch(
                const_cast<ef::Tensor&>(g->updates[k][static_cast<std::size_t>(j)].tensor).view())
                .to(torch::kFloat);
        if (ix.size() == 2) {
          sum.index_put_({ix[0].unsqueeze(1), ix[1]}, local, /*accumulate=*/true);
          count.index_put_({ix[0].unsqueeze(1), ix[1]}, torch::ones_like(local), true);
        } else {
          sum.index_put_({ix[0]}, local, true);
          count.index_put_({ix[0]}, torch::ones_like(local), true);
        }
      }
      const torch::Tensor covered = count > 0;
      torch::Tensor result = torch::where(covered, sum / count.clamp_min(1), base.to(torch::kFloat))
                                 .to(torch::kBFloat16);
      benchmark::DoNotOptimize(result.data_ptr());
    }
  }
  ef::bench::report(state, bytes_moved(), g->target_params, threads);
}
BENCHMARK(BM_AggregateTorch)
    ->ArgsProduct({threads_arg()})
    ->ArgNames({"threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
#endif

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv, "agg_scale", build); }
