// Tests for edgefuse/interop/distill.h: the autograd function against LibTorch's composite
// formulas in double (whose gradients are checked by central finite differences), GV-5b's
// hard-label mixing through the Distiller, training and determinism. Torch first: glog's CHECK
// must not replace doctest's (see the developers' guide).
#include "edgefuse/interop/distill.h"

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>
#include "error_of.h"

using namespace edgefuse;
using edgefuse_test::error_of;
namespace F = torch::nn::functional;

namespace {

// LibTorch's composite formulas, in the dtype of s (double here): batch-mean divergences.
torch::Tensor composite(const torch::Tensor& s, const torch::Tensor& t, double T, Divergence d,
                        double beta) {
  const torch::Tensor lq = torch::log_softmax(s / T, -1);
  const torch::Tensor lp = torch::log_softmax(t / T, -1);
  const double n = static_cast<double>(s.size(0));
  auto kl = [&](const torch::Tensor& la, const torch::Tensor& lb) {  // KL(a || b), batchmean
    return (la.exp() * (la - lb)).sum() / n;
  };
  if (d == Divergence::kForwardKL) {
    return T * T *
           F::kl_div(lq, lp, F::KLDivFuncOptions().reduction(torch::kBatchMean).log_target(true));
  }
  if (d == Divergence::kReverseKL) return T * T * kl(lq, lp);
  const torch::Tensor lm =
      torch::logsumexp(torch::stack({lp + std::log(beta), lq + std::log(1 - beta)}), 0);
  return T * T * (beta * kl(lp, lm) + (1 - beta) * kl(lq, lm));
}

}  // namespace

TEST_CASE(
    "The autograd function matches LibTorch's composite formulas, their gradients match "
    "finite differences") {
  torch::manual_seed(1);
  const std::int64_t rows = 6, vocab = 50;
  const torch::Tensor t = torch::randn({rows, vocab}, torch::kDouble) * 2;
  const torch::Tensor t32 = t.to(torch::kFloat).contiguous();
  const float* tp = t32.data_ptr<float>();
  const TeacherTarget teacher =
      logits_target(rows, vocab, std::vector<float>(tp, tp + rows * vocab));
  const torch::Tensor tf = t32.to(torch::kDouble);  // the teacher as stored
  for (const Divergence d : {Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD}) {
    INFO(divergence_name(d));
    const double T = 2.0, beta = 0.4;
    const torch::Tensor s0 = torch::randn({rows, vocab}, torch::kDouble) * 2;
    // The composite formula in double, its autograd gradient, and finite differences of it.
    torch::Tensor sd = s0.to(torch::kFloat).to(torch::kDouble).clone().requires_grad_(true);
    const torch::Tensor ref = composite(sd, tf, T, d, beta);
    ref.backward();
    const torch::Tensor ref_grad = sd.grad().clone();
    const double h = 1e-6;
    torch::NoGradGuard no_grad;
    for (std::int64_t i = 0; i < rows * vocab; i += 7) {
      torch::Tensor a = sd.detach().clone(), b = sd.detach().clone();
      a.view(-1)[i] += h;
      b.view(-1)[i] -= h;
      const double fd = (composite(a, tf, T, d, beta).item<double>() -
                         composite(b, tf, T, d, beta).item<double>()) /
                        (2 * h);
      CHECK(std::abs(fd - ref_grad.view(-1)[i].item<double>()) < 1e-7);
    }
    // The fused function in f32.
    torch::Tensor sf = s0.to(torch::kFloat).clone();
    {
      torch::AutoGradMode grad_on(true);
      sf.requires_grad_(true);
      LossOptions o;
      o.divergence = d;
      o.temperature = T;
      o.beta = beta;
      const torch::Tensor loss = distill_loss(sf, teacher, 0, o);
      CHECK(loss.dim() == 0);
      CHECK(std::abs(loss.item<double>() - ref.item<double>()) <
            1e-5 * std::abs(ref.item<double>()));
      (loss * 3.0).backward();  // the upstream scalar multiplies the kept gradient
    }
    const double err = (sf.grad().to(torch::kDouble) - 3.0 * ref_grad).abs().max().item<double>();
    CHECK(err < 1e-6);
  }
}

TEST_CASE("bf16 student logits get a bf16 gradient of the f32 loss") {
  const TeacherTarget teacher = logits_target(1, 4, {7.0f / 6, 7.0f / 6, 1.0f, -0.5f});
  torch::Tensor s =
      torch::tensor({{1.0f, 0.5f, -0.5f, 0.0f}}).to(torch::kBFloat16).requires_grad_(true);
  LossOptions o;
  o.temperature = 2;
  o.t_squared = false;
  const torch::Tensor loss = distill_loss(s, teacher, 0, o);
  loss.backward();
  CHECK(std::abs(loss.item<double>() - 0.05385102) < 1e-2);
  CHECK((s.grad().scalar_type() == torch::kBFloat16));
  CHECK(std::abs(s.grad()[0][2].item<double>() - -0.054482) < 1e-3);
}

TEST_CASE("distill: hard-label mixing through the Distiller (alpha = 0.5, y = 0, T = 2)") {
  // The "model" is the logits themselves: SGD with lr 1 moves them by exactly -gradient.
  torch::Tensor s = torch::tensor({{1.0f, 0.5f, -0.5f, 0.0f}}).requires_grad_(true);
  torch::optim::SGD sgd({s}, torch::optim::SGDOptions(1.0));
  DistillerOptions o;
  o.loss.temperature = 2;
  o.alpha = 0.5;
  o.shuffle = false;
  Distiller d([&](const torch::Tensor&) { return s * 1.0; }, sgd, o);
  const TeacherTarget teacher = logits_target(1, 4, {7.0f / 6, 7.0f / 6, 1.0f, -0.5f});
  const torch::Tensor before = s.detach().clone();
  const DistillStats st = d.step(torch::zeros({1, 1}), teacher, 0, torch::tensor({0L}));
  CHECK(std::abs(st.loss - 0.50137137) < 1e-6);
  CHECK(std::abs(st.ce - 0.78733867) < 1e-6);
  CHECK(std::abs(st.kd - 0.21540406) < 1e-6);
  const torch::Tensor grad = before - s.detach();
  const double want[] = {-0.220635, 0.112435, -0.058196, 0.166396};
  for (int i = 0; i < 4; ++i) CHECK(std::abs(grad[0][i].item<double>() - want[i]) < 1.5e-6);
}

TEST_CASE("The Distiller fits a student to an aggregated teacher, the same way every run") {
  const std::int64_t rows = 200, dim = 8, vocab = 12;
  auto train = [&](std::uint64_t seed) {
    torch::manual_seed(5);
    const torch::Tensor x = torch::randn({rows, dim});
    const torch::Tensor w_true = torch::randn({dim, vocab});
    const torch::Tensor z = torch::matmul(x, w_true);
    std::vector<float> logits(z.data_ptr<float>(), z.data_ptr<float>() + rows * vocab);
    const TeacherSignal a = dense_signal("a", rows, vocab, logits);
    for (float& v : logits) v *= 0.5f;
    const TeacherSignal b = dense_signal("b", rows, vocab, logits);
    TeacherOptions to;
    to.temperature = 2;
    const TeacherTarget teacher = aggregate_teachers({{&a, 1}, {&b, 1}}, to);
    torch::nn::Linear student(dim, vocab);
    torch::optim::Adam adam(student->parameters(), torch::optim::AdamOptions(0.05));
    DistillerOptions o;
    o.loss.temperature = 2;
    o.batch_rows = 32;
    o.seed = seed;
    o.clip_grad_norm = 5;
    Distiller d([&](const torch::Tensor& in) { return student->forward(in); }, adam, o);
    std::vector<double> losses;
    for (int e = 0; e < 30; ++e) losses.push_back(d.epoch(x, teacher).kd);
    CHECK(d.epochs_done() == 30);
    return std::make_pair(losses, student->weight.detach().clone());
  };
  const auto [l1, w1] = train(3);
  const auto [l2, w2] = train(3);
  CHECK(l1.back() < 0.1 * l1.front());
  CHECK(torch::equal(w1, w2));
  CHECK(l1 == l2);
}

TEST_CASE("Distiller and loss refuse bad options") {
  torch::Tensor s = torch::zeros({1, 4}, torch::requires_grad());
  torch::optim::SGD sgd({s}, torch::optim::SGDOptions(1.0));
  DistillerOptions o;
  o.alpha = 1.5;
  auto fwd = [&](const torch::Tensor&) { return s * 1.0; };
  CHECK(error_of([&] { Distiller(fwd, sgd, o); }) == "Distiller: alpha = 1.5 is outside [0, 1]");
  o.alpha = 0.5;
  Distiller d(fwd, sgd, o);
  const TeacherTarget teacher = logits_target(1, 4, {0, 0, 0, 0});
  CHECK(error_of([&] {
          d.step(torch::zeros({1, 1}), teacher, 0);
        }) == "Distiller: alpha > 0 needs hard labels");
  const TeacherTarget wide = logits_target(1, 5, {0, 0, 0, 0, 0});
  // A teacher the student's vocabulary does not match: refused before any update.
  Distiller plain(fwd, sgd, DistillerOptions{});
  const torch::Tensor before = s.detach().clone();
  CHECK(error_of([&] {
          plain.step(torch::zeros({1, 1}), wide, 0);
        }) == "distill_loss: student vocabulary 4 differs from the teacher's 5");
  CHECK(torch::equal(before, s.detach()));
  LossOptions lo;
  CHECK(error_of([&] { distill_loss(s, wide, 0, lo); }) ==
        "distill_loss: student vocabulary 4 differs from the teacher's 5");
  lo.temperature = -2;
  CHECK(error_of([&] { distill_loss(s, teacher, 0, lo); }) ==
        "distill_loss: temperature T = -2 must be a finite value > 0");
}
