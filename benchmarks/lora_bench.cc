// LoRA merge into Llama-7B-shaped layers (q, k, v, o: 4096x4096; gate, up: 11008x4096; down:
// 4096x11008; 202M parameters, bf16) at r = 8, 16, 64. BM_MergeEdgefuse is lora_update (B·A
// never formed, fp32 accumulation, one rounding); BM_MergeTorch is PEFT's CPU way in LibTorch
// (delta = (B@A)*s in fp32, then W += delta into the bf16 weight); BM_FlexLoraEdgefuse
// aggregates 100 rank-16 clients on one 4096x4096 weight with the factored SVD (no dense
// 4096x4096 temporary); BM_FactoredSvd times that SVD alone on each instruction-set copy.
//
// Bytes counted per merge (what it must move at least): every weight read and written (bf16)
// and the factors read (f32). The merge is compute-bound at these ranks on CPUs whose
// arithmetic per byte is low: each output element costs r multiply-adds.
//
// Flags (before Google Benchmark's own): --lora_scale=full (default) or --lora_scale=small
// (256-wide layers, for smoke tests).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/bench_common.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"
#include "edgefuse/lora/federated.h"

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include "edgefuse/interop/torch.h"
#endif

namespace ef = edgefuse;

namespace {

struct Layer {
  std::uint64_t out, in;
};

struct Setup {
  std::vector<Layer> layers;
  std::vector<ef::Tensor> weights;
  double params = 0;
  std::uint64_t flex_dim = 4096;
  int flex_clients = 100;
};
Setup* g = nullptr;

ef::Tensor random_f32(std::uint64_t r, std::uint64_t c, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  ef::Tensor t = ef::Tensor::empty(ef::DType::kF32, ef::Shape{r, c});
  float* p = t.view().data_as<float>();
  for (std::uint64_t i = 0; i < t.numel(); ++i) p[i] = u(rng);
  return t;
}

void build(bool small) {
  g = new Setup;
  const std::uint64_t h = small ? 256 : 4096, m = small ? 688 : 11008;
  g->layers = {{h, h}, {h, h}, {h, h}, {h, h}, {m, h}, {m, h}, {h, m}};
  if (small) {
    g->flex_dim = 256;
    g->flex_clients = 10;
  }
  for (const auto& l : g->layers) {
    ef::Tensor w = ef::Tensor::empty(ef::DType::kBF16, ef::Shape{l.out, l.in});
    auto* p = w.view().data_as<ef::BFloat16>();
    for (std::uint64_t i = 0; i < w.numel(); ++i) {
      p[i].bits = static_cast<std::uint16_t>(
          0x3C00 | ((static_cast<std::uint32_t>(i) * 2654435761u >> 16) & 0x3FF));
    }
    g->params += static_cast<double>(w.numel());
    g->weights.push_back(std::move(w));
  }
}

std::vector<ef::LoraModule> adapters_for(std::uint64_t r) {
  std::vector<ef::LoraModule> ms;
  unsigned seed = 1;
  for (const auto& l : g->layers) {
    const ef::Tensor a = random_f32(r, l.in, seed++, 1e-3f),
                     b = random_f32(l.out, r, seed++, 1e-3f);
    ms.push_back(ef::make_lora_module("m", a.view(), b.view(), 2.0, "bench"));
  }
  return ms;
}

double merge_bytes(std::uint64_t r) {
  double factors = 0;
  for (const auto& l : g->layers)
    factors += 4.0 * static_cast<double>(r) * static_cast<double>(l.out + l.in);
  return 2 * 2 * g->params + factors;
}

std::vector<std::int64_t> threads_arg() {
  std::vector<std::int64_t> t;
  for (int x : ef::bench::thread_counts()) t.push_back(x);
  return t;
}

void BM_MergeEdgefuse(benchmark::State& state) {
  const auto r = static_cast<std::uint64_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  ef::set_num_threads(static_cast<std::size_t>(threads));
  const auto ms = adapters_for(r);
  for (auto _ : state) {
    for (std::size_t i = 0; i < ms.size(); ++i) ef::merge_lora(g->weights[i].view(), ms[i]);
    benchmark::ClobberMemory();
  }
  ef::bench::report(state, merge_bytes(r), g->params, threads);
}
BENCHMARK(BM_MergeEdgefuse)
    ->ArgsProduct({{8, 16, 64}, threads_arg()})
    ->ArgNames({"r", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
void BM_MergeTorch(benchmark::State& state) {
  const auto r = static_cast<std::uint64_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  at::set_num_threads(threads);
  const auto ms = adapters_for(r);
  std::vector<torch::Tensor> w, a, b;
  for (std::size_t i = 0; i < ms.size(); ++i) {
    w.push_back(ef::as_torch(g->weights[i].view()));
    a.push_back(ef::as_torch(const_cast<ef::Tensor&>(ms[i].a).view()));
    b.push_back(ef::as_torch(const_cast<ef::Tensor&>(ms[i].b).view()));
  }
  for (auto _ : state) {
    for (std::size_t i = 0; i < ms.size(); ++i) {
      // PEFT Linear.get_delta_weight + merge on CPU: fp32 product, scaled, added in place.
      const torch::Tensor delta = torch::mm(b[i], a[i]).mul_(ms[i].scaling);
      w[i].add_(delta);
    }
    benchmark::ClobberMemory();
  }
  ef::bench::report(state, merge_bytes(r), g->params, threads);
}
BENCHMARK(BM_MergeTorch)
    ->ArgsProduct({{8, 16, 64}, threads_arg()})
    ->ArgNames({"r", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
#endif

void BM_FlexLoraEdgefuse(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  ef::set_num_threads(static_cast<std::size_t>(threads));
  const std::uint64_t d = g->flex_dim, r = 16;
  std::vector<ef::LoraAdapter> clients(static_cast<std::size_t>(g->flex_clients));
  std::vector<ef::ClientLora> in;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    const auto a = random_f32(r, d, 1000 + 2 * static_cast<unsigned>(k), 0.05f);
    const auto b = random_f32(d, r, 1001 + 2 * static_cast<unsigned>(k), 0.05f);
    clients[k].label = "client";
    clients[k].modules.push_back(ef::make_lora_module("q_proj", a.view(), b.view(), 2.0, "bench"));
    in.push_back({&clients[k], static_cast<double>(100 + k)});
  }
  for (auto _ : state) {
    const auto res = ef::federated_lora(ef::FederatedRule::kFlexLora, in);
    benchmark::DoNotOptimize(res.global.modules.data());
  }
  // Bytes: the clients' factors read once.
  ef::bench::report(state, 4.0 * 2 * static_cast<double>(d * r) * g->flex_clients,
                    static_cast<double>(d * d), threads);
}
BENCHMARK(BM_FlexLoraEdgefuse)
    ->ArgsProduct({threads_arg()})
    ->ArgNames({"threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

// factored_svd alone on the same 100 rank-16 clients, on each instruction-set copy this CPU
// runs (isa = index into detail::factored_svd_isas(): 0 baseline, then avx2, avx512).
void BM_FactoredSvd(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const auto isas = ef::detail::factored_svd_isas();
  const auto isa = static_cast<std::size_t>(state.range(1));
  if (isa >= isas.size()) {
    state.SkipWithError("this CPU has no such instruction-set copy");
    return;
  }
  ef::set_num_threads(static_cast<std::size_t>(threads));
  const std::uint64_t d = g->flex_dim, r = 16;
  std::vector<ef::Tensor> as, bs;
  std::vector<const ef::Tensor*> ap, bp;
  std::vector<double> coef;
  for (int k = 0; k < g->flex_clients; ++k) {
    as.push_back(random_f32(r, d, 1000 + 2 * static_cast<unsigned>(k), 0.05f));
    bs.push_back(random_f32(d, r, 1001 + 2 * static_cast<unsigned>(k), 0.05f));
    coef.push_back(2.0 * (100 + k));
  }
  for (std::size_t k = 0; k < as.size(); ++k) {
    ap.push_back(&as[k]);
    bp.push_back(&bs[k]);
  }
  for (auto _ : state) {
    const auto res = ef::detail::factored_svd_on(isas[isa], bp, ap, coef, r);
    benchmark::DoNotOptimize(res.us.view().data());
  }
  state.SetLabel(isas[isa]);
  ef::bench::report(state, 4.0 * 2 * static_cast<double>(d * r) * g->flex_clients,
                    static_cast<double>(d * d), threads);
}
BENCHMARK(BM_FactoredSvd)
    ->ArgsProduct({threads_arg(), {0, 1, 2}})
    ->ArgNames({"threads", "isa"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv, "lora_scale", build); }
