// The fused distillation loss (distill/loss.h: forward KL at T = 2 with T², loss and gradient
// in one call) against LibTorch's way (log_softmax of student and teacher, kl_div with
// batchmean and log_target, autograd backward to the student logits), same inputs, same
// threads (all the machine's), at 2048 x 32000 (Llama-2 vocabulary) and 512 x 128256
// (Llama-3 vocabulary): BM_DistillLossFused/<rows>/<vocab> and BM_DistillLossTorch/<rows>/<vocab>.
//
// Bytes counted per call: student and teacher logits read, gradient written (f32). The fused
// loss is compute-bound (two exps per element) on CPUs; the roofline column says how far from
// memory speed it is.
//
// Flags (before Google Benchmark's own): --distill_scale=full (default) or
// --distill_scale=small (64 x 1000 and 16 x 4000, for smoke tests).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/bench_common.h"
#include "edgefuse/distill/loss.h"

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
#include "edgefuse/interop/torch.h"
#endif

namespace ef = edgefuse;

namespace {

constexpr double kT = 2.0;

struct Case {
  std::size_t rows, vocab;
  std::vector<float> student;
  ef::TeacherTarget teacher;
};
std::vector<Case>* g = nullptr;

std::vector<float> random_logits(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

int all_threads() { return ef::bench::thread_counts().back(); }

double bytes_of(const Case& c) { return 3.0 * 4.0 * static_cast<double>(c.rows * c.vocab); }

void BM_DistillLossFused(benchmark::State& state, const Case* c) {
  const int threads = all_threads();
  ef::set_num_threads(static_cast<std::size_t>(threads));
  ef::LossOptions o;
  o.temperature = kT;
  std::vector<float> grad(c->rows * c->vocab);
  for (auto _ : state) {
    const double loss = ef::distill_loss(c->student.data(), c->rows, c->vocab, 0, c->teacher, 0, o,
                                         grad.data(), 1.0f / static_cast<float>(c->rows));
    benchmark::DoNotOptimize(loss);
    benchmark::ClobberMemory();
  }
  ef::bench::report(state, bytes_of(*c), static_cast<double>(c->rows * c->vocab), threads);
}

#if defined(EDGEFUSE_BENCH_WITH_TORCH)
void BM_DistillLossTorch(benchmark::State& state, const Case* c) {
  const int threads = all_threads();
  at::set_num_threads(threads);
  const auto rows = static_cast<std::int64_t>(c->rows), vocab = static_cast<std::int64_t>(c->vocab);
  const torch::Tensor s0 =
      torch::from_blob(const_cast<float*>(c->student.data()), {rows, vocab}, torch::kFloat);
  const torch::Tensor t =
      torch::from_blob(const_cast<float*>(c->teacher.values.data()), {rows, vocab}, torch::kFloat);
  const torch::Tensor s = s0.clone().requires_grad_(true);
  namespace F = torch::nn::functional;
  for (auto _ : state) {
    const torch::Tensor ls = torch::log_softmax(s / kT, -1);
    const torch::Tensor lt = torch::log_softmax(t / kT, -1);
    const torch::Tensor loss =
        kT * kT *
        F::kl_div(ls, lt, F::KLDivFuncOptions().reduction(torch::kBatchMean).log_target(true));
    const auto grads = torch::autograd::grad({loss}, {s});
    benchmark::DoNotOptimize(grads[0].data_ptr());
    benchmark::ClobberMemory();
  }
  ef::bench::report(state, bytes_of(*c), static_cast<double>(c->rows * c->vocab), threads);
}
#endif

void build(bool small) {
  g = new std::vector<Case>;
  const std::vector<std::pair<std::size_t, std::size_t>> shapes =
      small ? std::vector<std::pair<std::size_t, std::size_t>>{{64, 1000}, {16, 4000}}
            : std::vector<std::pair<std::size_t, std::size_t>>{{2048, 32000}, {512, 128256}};
  g->reserve(shapes.size());
  unsigned seed = 1;
  for (const auto& [rows, vocab] : shapes) {
    Case c;
    c.rows = rows;
    c.vocab = vocab;
    c.student = random_logits(rows * vocab, seed++);
    c.teacher = ef::logits_target(rows, vocab, random_logits(rows * vocab, seed++));
    g->push_back(std::move(c));
  }
  for (const Case& c : *g) {
    const std::string args = "/" + std::to_string(c.rows) + "/" + std::to_string(c.vocab);
    benchmark::RegisterBenchmark(("BM_DistillLossFused" + args).c_str(), BM_DistillLossFused, &c)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
#if defined(EDGEFUSE_BENCH_WITH_TORCH)
    benchmark::RegisterBenchmark(("BM_DistillLossTorch" + args).c_str(), BM_DistillLossTorch, &c)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
#endif
  }
}

}  // namespace

int main(int argc, char** argv) { return ef::bench::run_main(argc, argv, "distill_scale", build); }
