// Benchmarks of the server-side rules (kernels/server_step.h, kernels/robust_reduce.h) against the
// STREAM triad measured in this process and against LibTorch doing the same step with tensor ops.
//
// The step reads the bf16 target, the f32 sums (acc, wsum) and the optimizer state, and writes
// the target and the state: 2 + 8 + 8 + 2 + 8 = 28 bytes per element for the two-state rules
// (FedAdam, FedYogi, FedAdagrad), 20 for the one-state ones (FedAvgM, Nesterov). Every element
// is covered (a full-model round). Arguments (threads, n), n from cache-sized to >= 1 GiB moved.
//
// Krum: a Multi-Krum round of the Aggregator over k whole-model f32 clients of one [n/1024,
// 1024] tensor (f = 1, m = k - 2): the statistics pass reads the k clients and sums every
// pair's squared differences in f64, then the m selected are fused into the f32 target. The
// bytes are 4k (statistics) + 4m (fusion) + 8 (target and output) per element. LibTorch's
// peer computes the same distance matrix as Flower does, ||x||^2 + ||y||^2 - 2 x.y from one
// [k, n] x [n, k] product, in f64, then the mean of the m selected rows.
// Run: ./server_bench --benchmark_filter=FedAdam
#include <benchmark/benchmark.h>

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include <torch/torch.h>
#endif

#include <cstdint>
#include <vector>

#include "benchmarks/bench_common.h"
#include "benchmarks/stream_sweep.h"
#include "edgefuse/edgefuse.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "edgefuse/kernels/server_step.h"

namespace ef = edgefuse;

namespace {

using ef::bench::use_threads;

void report(benchmark::State& state, double bytes_per_param) {
  ef::bench::report_per_param(state, bytes_per_param);
}

// Buffers filled in parallel, so their pages are faulted in before timing.
template <typename T>
std::vector<T> filled(std::size_t n, float value) {
  std::vector<T> v(n);
  ef::parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) {
      const float x = value + static_cast<float>(i % 97) * 0x1p-10f;
      if constexpr (std::is_same_v<T, float>) {
        v[i] = x;
      } else {
        v[i] = ef::to_bf16(x);
      }
    }
  });
  return v;
}

template <ef::ServerRule kRule>
void BM_ServerStep(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  std::vector<ef::BFloat16> w = filled<ef::BFloat16>(n, 1.0f);
  std::vector<float> acc = filled<float>(n, 1e-3f), wsum = filled<float>(n, 2.0f);
  std::vector<float> m = filled<float>(n, 0.0f), v = filled<float>(n, 1e-4f);
  ef::ServerStep p;
  p.rule = kRule;
  p.lr = 1e-3f;
  const bool two = kRule != ef::ServerRule::kFedAvgM && kRule != ef::ServerRule::kNesterov;
  for (auto _ : state) {
    ef::server_step(w.data(), w.data(), acc.data(), wsum.data(), m.data(), two ? v.data() : nullptr,
                    n, p);
    benchmark::ClobberMemory();
  }
  report(state, two ? 28.0 : 20.0);
}

// The coordinate-wise median or 0.2-trimmed mean over k clients that all cover every element:
// k f32 reads, one f32 and one u32 write per element.
template <ef::RobustRule kRule, int kClients>
void BM_Robust(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  std::vector<float> values(n * kClients);
  ef::parallel_for(values.size(), std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) values[i] = static_cast<float>((i * 2654435761u) % 1000);
  });
  std::vector<float> out = filled<float>(n, 0.0f);
  std::vector<std::uint32_t> count(n);
  for (auto _ : state) {
    ef::robust_reduce(values.data(), kClients, n, n, kRule, 0.2, out.data(), count.data());
    benchmark::ClobberMemory();
  }
  report(state, 4.0 * kClients + 8.0);
}

// A Multi-Krum round (f = 1, m = k - 2) of k whole-model clients in the Aggregator.
template <int kClients>
void BM_MultiKrumRound(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  const ef::Shape shape{n / 1024, 1024};
  std::vector<float> target = filled<float>(n, 1.0f), out(n);
  std::vector<std::vector<float>> clients;
  for (int c = 0; c < kClients; ++c) clients.push_back(filled<float>(n, 1.0f + 0.01f * c));
  ef::ModelLayout layout =
      ef::Schema::from_json(
          R"({"axes": {"rows": {"size": )" + std::to_string(n / 1024) +
              R"(}, "cols": {"size": 1024}}, "tensors": {"w": ["rows", "cols"]}})",
          "krum.json")
          .bind({ef::TensorMeta{"w", ef::DType::kF32, shape}});
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kParams;
  opt.selection = ef::ClientSelection{ef::SelectionRule::kMultiKrum, 1, kClients - 2};
  const ef::NamedViews base{{"w", ef::ConstTensorView(target.data(), ef::DType::kF32, shape)}};
  for (auto _ : state) {
    ef::Aggregator agg(layout, opt);
    for (int c = 0; c < kClients; ++c) {
      agg.add({{"w", ef::ConstTensorView(clients[static_cast<std::size_t>(c)].data(),
                                         ef::DType::kF32, shape)}},
              ef::Plan{}, 1.0f, "c" + std::to_string(c));
    }
    agg.finalize(base, {ef::TensorView(out.data(), ef::DType::kF32, shape)});
    benchmark::ClobberMemory();
  }
  report(state, 4.0 * kClients + 4.0 * (kClients - 2) + 8.0);
}

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
// Multi-Krum the LibTorch way (Flower's formula): the Gram matrix of the [k, n] clients in
// f64, distances from it, the scores' m lowest, and the mean of those rows.
template <int kClients>
void BM_MultiKrumTorch(benchmark::State& state) {
  use_threads(state);
  const std::int64_t n = state.range(1);
  torch::Tensor x = torch::rand({kClients, n});
  for (auto _ : state) {
    torch::Tensor xd = x.to(torch::kDouble);
    torch::Tensor g = xd.matmul(xd.t());
    torch::Tensor sq = g.diag();
    torch::Tensor d = sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * g;
    torch::Tensor closest = std::get<0>(d.sort(1)).narrow(1, 1, kClients - 3);
    torch::Tensor scores = closest.sum(1);
    torch::Tensor chosen = std::get<1>(scores.sort()).narrow(0, 0, kClients - 2);
    torch::Tensor mean = x.index_select(0, chosen).mean(0);
    benchmark::DoNotOptimize(mean.data_ptr());
  }
  report(state, 4.0 * kClients + 4.0 * (kClients - 2) + 8.0);
}

// The median over clients the LibTorch way: torch::median along the client dimension of a
// [k, n] tensor.
template <int kClients>
void BM_MedianTorch(benchmark::State& state) {
  use_threads(state);
  const std::int64_t n = state.range(1);
  torch::Tensor values = torch::rand({kClients, n});
  for (auto _ : state) {
    torch::Tensor m = std::get<0>(values.median(0));
    benchmark::DoNotOptimize(m.data_ptr());
  }
  report(state, 4.0 * kClients + 8.0);
}

// FedAdam the LibTorch way: the mean, in-place moment updates, the step in f32, written back
// into the bf16 weights where covered.
void BM_FedAdamTorch(benchmark::State& state) {
  use_threads(state);
  const std::int64_t n = state.range(1);
  torch::Tensor w = torch::full({n}, 1.0f, torch::kBFloat16);
  torch::Tensor acc = torch::full({n}, 1e-3f), wsum = torch::full({n}, 2.0f);
  torch::Tensor m = torch::zeros({n}), v = torch::full({n}, 1e-4f);
  const double b1 = 0.9, b2 = 0.99, tau = 1e-3, lr = 1e-3;
  for (auto _ : state) {
    torch::Tensor covered = wsum > 0;
    torch::Tensor d = acc / wsum;
    m.mul_(b1).add_(d, 1 - b1);
    v.mul_(b2).addcmul_(d, d, 1 - b2);
    torch::Tensor base = w.to(torch::kFloat);
    torch::Tensor stepped = base + lr * m / (v.sqrt() + tau);
    w.copy_(torch::where(covered, stepped, base));
    benchmark::ClobberMemory();
  }
  report(state, 28.0);
}
#endif

EDGEFUSE_BENCH(BM_ServerStep<ef::ServerRule::kFedAdam>, 28.0);
EDGEFUSE_BENCH(BM_ServerStep<ef::ServerRule::kFedYogi>, 28.0);
EDGEFUSE_BENCH(BM_ServerStep<ef::ServerRule::kFedAvgM>, 20.0);
EDGEFUSE_BENCH(BM_ServerStep<ef::ServerRule::kNesterov>, 20.0);
EDGEFUSE_BENCH((BM_Robust<ef::RobustRule::kMedian, 4>), 24.0);
EDGEFUSE_BENCH((BM_Robust<ef::RobustRule::kMedian, 8>), 40.0);
EDGEFUSE_BENCH((BM_Robust<ef::RobustRule::kMedian, 16>), 72.0);
EDGEFUSE_BENCH((BM_Robust<ef::RobustRule::kTrimmedMean, 8>), 40.0);
EDGEFUSE_BENCH(BM_MultiKrumRound<8>, 64.0);
#if defined(EDGEFUSE_BENCH_WITH_TORCH)
EDGEFUSE_BENCH(BM_FedAdamTorch, 28.0);
EDGEFUSE_BENCH(BM_MedianTorch<4>, 24.0);
EDGEFUSE_BENCH(BM_MedianTorch<8>, 40.0);
EDGEFUSE_BENCH(BM_MedianTorch<16>, 72.0);
EDGEFUSE_BENCH(BM_MultiKrumTorch<8>, 64.0);
#endif

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv); }
