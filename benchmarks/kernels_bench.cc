// Benchmarks of the streaming kernels (kernels/accumulate.h, finalize.h, convert.h) against
// the STREAM triad measured in this process and against LibTorch doing the same operation.
//
// Every benchmark takes (threads, n) with the element count n last, sweeps n from
// cache-sized to DRAM-sized (>= 1 GiB moved per iteration at the largest n) and reports:
//   bytes_per_second   SetBytesProcessed with the bytes the operation must move (reads of
//                      every input, writes of every output; no write-allocate)
//   roofline           bytes/s divided by the triad's bytes/s at the same thread count
//   params_per_second  elements processed per second
// and the SIMD target as its label. Run: ./kernels_bench --benchmark_filter=BF16
#include <benchmark/benchmark.h>

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include <torch/torch.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "benchmarks/bench_common.h"
#include "benchmarks/stream_sweep.h"
#include "edgefuse/edgefuse.h"
#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include "edgefuse/interop/torch.h"
#endif

namespace ef = edgefuse;

namespace {

using ef::bench::thread_counts;

using ef::bench::use_threads;

void report(benchmark::State& state, double bytes_per_param) {
  ef::bench::report_per_param(state, bytes_per_param);
}

// Owning buffers filled in parallel (so the pages are faulted in before timing).
template <typename T>
ef::Tensor filled(std::size_t n, float value) {
  ef::Tensor t = ef::Tensor::empty(ef::dtype_of<T>, {n});
  T* p = t.view().data_as<T>();
  ef::parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) {
      const float v = value + static_cast<float>(i % 97) * 0x1p-10f;
      if constexpr (std::is_same_v<T, float>)
        p[i] = v;
      else if constexpr (std::is_same_v<T, ef::BFloat16>)
        p[i] = ef::to_bf16(v);
      else
        p[i] = ef::to_f16(v);
    }
  });
  return t;
}

template <typename T>
T* ptr(ef::Tensor& t) {
  return t.view().data_as<T>();
}

// ------------------------------------------------------------------------ accumulate

template <typename T>
void BM_Accumulate(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  ef::Tensor acc = filled<float>(n, 0.0f);
  ef::Tensor x = filled<T>(n, 1.0f);
  for (auto _ : state) {
    ef::accumulate(ptr<float>(acc), ptr<T>(x), n, 1e-3f);
    benchmark::ClobberMemory();
  }
  report(state, 8.0 + sizeof(T));
}

// A FedRolex-style window: the client owns half of each 2048-wide row, starting at column
// 1536 and wrapping around, so every row is two runs of 512.
void BM_AccumulateRunsBF16(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));  // client values
  const std::size_t width = 2048, half = width / 2, rows = std::max<std::size_t>(1, n / half);
  std::vector<ef::Run> runs;
  for (std::size_t r = 0; r < rows; ++r) {
    runs.push_back({r * width + 1536, 512});
    runs.push_back({r * width, 512});
  }
  ef::Tensor acc = filled<float>(rows * width, 0.0f);
  ef::Tensor x = filled<ef::BFloat16>(rows * half, 1.0f);
  for (auto _ : state) {
    ef::accumulate_runs(ptr<float>(acc), rows * width, ptr<ef::BFloat16>(x), rows * half,
                        runs.data(), runs.size(), 1e-3f);
    benchmark::ClobberMemory();
  }
  report(state, 10.0);
}

void BM_AccumulateIndexedBF16(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  const std::size_t acc_len = 2 * n;
  std::vector<std::uint32_t> idx(acc_len);
  std::iota(idx.begin(), idx.end(), 0u);
  std::shuffle(idx.begin(), idx.end(), std::mt19937(1));
  idx.resize(n);
  std::sort(idx.begin(), idx.end());  // plans give sorted random subsets
  ef::Tensor acc = filled<float>(acc_len, 0.0f);
  ef::Tensor x = filled<ef::BFloat16>(n, 1.0f);
  for (auto _ : state) {
    ef::accumulate_indexed(ptr<float>(acc), acc_len, ptr<ef::BFloat16>(x), idx.data(), n, 1e-3f);
    benchmark::ClobberMemory();
  }
  report(state, 14.0);  // x 2, index 4, acc 4 + 4
}

// ------------------------------------------------------------------------ finalize

template <typename T, ef::FinalizeMode kMode>
void BM_Finalize(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  ef::Tensor w = filled<T>(n, 1.0f);
  ef::Tensor acc = filled<float>(n, 0.5f);
  ef::Tensor wsum = filled<float>(n, 2.0f);
  for (auto _ : state) {
    ef::finalize(ptr<T>(w), ptr<T>(w), ptr<float>(acc), ptr<float>(wsum), n, kMode, 1e-3f);
    benchmark::ClobberMemory();
  }
  report(state, 8.0 + 2.0 * sizeof(T));  // acc, wsum, base read; out written in place
}

// ------------------------------------------------------------------------ convert

void BM_ConvertF32ToBF16(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  ef::Tensor src = filled<float>(n, 1.0f);
  ef::Tensor dst = filled<ef::BFloat16>(n, 0.0f);
  for (auto _ : state) {
    ef::convert(ptr<float>(src), ptr<ef::BFloat16>(dst), n);
    benchmark::ClobberMemory();
  }
  report(state, 6.0);
}

void BM_Triad(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  ef::Tensor a = filled<float>(n, 0.0f), b = filled<float>(n, 1.0f), c = filled<float>(n, 2.0f);
  for (auto _ : state) {
    ef::triad(ptr<float>(a), ptr<float>(b), ptr<float>(c), 3.0f, n);
    benchmark::ClobberMemory();
  }
  report(state, 12.0);
}

// ------------------------------------------------------------------------ scalar baseline

// The plain loop a C++ FL server would write (compiled without SIMD dispatch).
void BM_AccumulateBF16Scalar(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  ef::Tensor acc = filled<float>(n, 0.0f);
  ef::Tensor x = filled<ef::BFloat16>(n, 1.0f);
  float* a = ptr<float>(acc);
  const ef::BFloat16* xp = ptr<ef::BFloat16>(x);
  for (auto _ : state) {
    ef::parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) a[i] += 1e-3f * ef::to_f32(xp[i]);
    });
    benchmark::ClobberMemory();
  }
  report(state, 10.0);
}

// ------------------------------------------------------------------------ LibTorch baselines

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
torch::Tensor torch_filled(std::size_t n, float v, torch::ScalarType type) {
  return torch::full({static_cast<std::int64_t>(n)}, v, torch::TensorOptions().dtype(type));
}

// acc += w * x the LibTorch way: widen the bf16 update, then add_ with alpha.
template <typename T>
void BM_AccumulateTorch(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  torch::Tensor acc = torch_filled(n, 0.0f, torch::kFloat);
  torch::Tensor x = torch_filled(n, 1.0f, ef::to_torch_dtype(ef::dtype_of<T>));
  for (auto _ : state) {
    acc.add_(x.to(torch::kFloat), 1e-3);
    benchmark::ClobberMemory();
  }
  report(state, 8.0 + sizeof(T));
}

// The same window as BM_AccumulateRunsBF16, as two strided slices of a [rows, 2048] view.
void BM_AccumulateRunsBF16Torch(benchmark::State& state) {
  use_threads(state);
  const std::int64_t n = state.range(1);
  const std::int64_t rows = std::max<std::int64_t>(1, n / 1024);
  torch::Tensor acc = torch::zeros({rows, 2048});
  torch::Tensor x = torch::ones({rows, 1024}, torch::kBFloat16);
  for (auto _ : state) {
    torch::Tensor xf = x.to(torch::kFloat);
    acc.narrow(1, 1536, 512).add_(xf.narrow(1, 0, 512), 1e-3);
    acc.narrow(1, 0, 512).add_(xf.narrow(1, 512, 512), 1e-3);
    benchmark::ClobberMemory();
  }
  report(state, 10.0);
}

void BM_AccumulateIndexedBF16Torch(benchmark::State& state) {
  use_threads(state);
  const std::int64_t n = state.range(1);
  torch::Tensor idx = std::get<0>(torch::randperm(2 * n, torch::kLong).narrow(0, 0, n).sort());
  torch::Tensor acc = torch::zeros({2 * n});
  torch::Tensor x = torch::ones({n}, torch::kBFloat16);
  for (auto _ : state) {
    acc.index_add_(0, idx, x.to(torch::kFloat), 1e-3);
    benchmark::ClobberMemory();
  }
  report(state, 14.0);
}

// The coverage-weighted finalize with torch ops, written back into the bf16 weights.
template <typename T, ef::FinalizeMode kMode>
void BM_FinalizeTorch(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  torch::Tensor w = torch_filled(n, 1.0f, ef::to_torch_dtype(ef::dtype_of<T>));
  torch::Tensor acc = torch_filled(n, 0.5f, torch::kFloat);
  torch::Tensor wsum = torch_filled(n, 2.0f, torch::kFloat);
  for (auto _ : state) {
    torch::Tensor base = w.to(torch::kFloat);
    torch::Tensor mean = acc / wsum;
    torch::Tensor updated = kMode == ef::FinalizeMode::kDelta ? base + 1e-3 * mean : mean;
    w.copy_(torch::where(wsum > 0, updated, base));
    benchmark::ClobberMemory();
  }
  report(state, 8.0 + 2.0 * sizeof(T));
}

void BM_ConvertF32ToBF16Torch(benchmark::State& state) {
  use_threads(state);
  const std::size_t n = static_cast<std::size_t>(state.range(1));
  torch::Tensor src = torch_filled(n, 1.0f, torch::kFloat);
  torch::Tensor dst = torch_filled(n, 0.0f, torch::kBFloat16);
  for (auto _ : state) {
    dst.copy_(src);
    benchmark::ClobberMemory();
  }
  report(state, 6.0);
}
#endif

using ef::BFloat16;
using ef::FinalizeMode;
using ef::Float16;

EDGEFUSE_BENCH(BM_Triad, 12.0);
EDGEFUSE_BENCH(BM_Accumulate<float>, 12.0);
EDGEFUSE_BENCH(BM_Accumulate<BFloat16>, 10.0);
EDGEFUSE_BENCH(BM_Accumulate<Float16>, 10.0);
EDGEFUSE_BENCH(BM_AccumulateBF16Scalar, 10.0);
EDGEFUSE_BENCH(BM_AccumulateRunsBF16, 10.0);
EDGEFUSE_BENCH(BM_AccumulateIndexedBF16, 14.0);
EDGEFUSE_BENCH((BM_Finalize<BFloat16, FinalizeMode::kDelta>), 12.0);
EDGEFUSE_BENCH((BM_Finalize<BFloat16, FinalizeMode::kReplace>), 12.0);
EDGEFUSE_BENCH((BM_Finalize<Float16, FinalizeMode::kDelta>), 12.0);
EDGEFUSE_BENCH((BM_Finalize<float, FinalizeMode::kDelta>), 16.0);
EDGEFUSE_BENCH(BM_ConvertF32ToBF16, 6.0);
#if defined(EDGEFUSE_BENCH_WITH_TORCH)
EDGEFUSE_BENCH(BM_AccumulateTorch<float>, 12.0);
EDGEFUSE_BENCH(BM_AccumulateTorch<BFloat16>, 10.0);
EDGEFUSE_BENCH(BM_AccumulateTorch<Float16>, 10.0);
EDGEFUSE_BENCH(BM_AccumulateRunsBF16Torch, 10.0);
EDGEFUSE_BENCH(BM_AccumulateIndexedBF16Torch, 14.0);
EDGEFUSE_BENCH((BM_FinalizeTorch<BFloat16, FinalizeMode::kDelta>), 12.0);
EDGEFUSE_BENCH((BM_FinalizeTorch<BFloat16, FinalizeMode::kReplace>), 12.0);
EDGEFUSE_BENCH((BM_FinalizeTorch<Float16, FinalizeMode::kDelta>), 12.0);
EDGEFUSE_BENCH((BM_FinalizeTorch<float, FinalizeMode::kDelta>), 16.0);
EDGEFUSE_BENCH(BM_ConvertF32ToBF16Torch, 6.0);
#endif

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv); }
