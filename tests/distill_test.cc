// Tests for distill/{signals,teacher,loss}.h: every golden vector (numbered GV-1 to
// GV-7 here) on every SIMD target, the fused loss against an independent double reference whose
// gradient is checked by central finite differences, invariance to shifting a row, identical
// bits for any thread count, and the bad inputs of issue 6.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/distill/loss.h"
#include "edgefuse/distill/signals.h"
#include "edgefuse/distill/teacher.h"
#include "reference.h"
#include "error_of.h"

using namespace edgefuse;
using edgefuse_test::error_of;

namespace {

using Vec = std::vector<double>;

// ---------------------------------------------------------------- double reference

Vec softmax(const Vec& z, double T) {
  double m = -INFINITY;
  for (double x : z) m = std::max(m, x / T);
  Vec p(z.size());
  double s = 0.0;
  for (std::size_t i = 0; i < z.size(); ++i) s += (p[i] = std::exp(z[i] / T - m));
  for (double& x : p) x /= s;
  return p;
}

double kl(const Vec& p, const Vec& q) {
  double s = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] > 0.0) s += p[i] * std::log(p[i] / q[i]);
  }
  return s;
}

// The divergence between teacher distribution p and student softmax(s / T), by definition.
double ref_loss(const Vec& s, const Vec& p, double T, Divergence d, double beta, bool t2) {
  const Vec q = softmax(s, T);
  double l = 0.0;
  if (d == Divergence::kJSD && beta == 0.0) d = Divergence::kForwardKL;
  if (d == Divergence::kJSD && beta == 1.0) d = Divergence::kReverseKL;
  if (d == Divergence::kForwardKL) {
    l = kl(p, q);
  } else if (d == Divergence::kReverseKL) {
    l = kl(q, p);
  } else {
    Vec m(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) m[i] = beta * p[i] + (1 - beta) * q[i];
    l = d == Divergence::kJSD ? beta * kl(p, m) + (1 - beta) * kl(q, m)
                              : (1 - beta) * kl(p, m) + beta * kl(q, m);
  }
  return t2 ? l * T * T : l;
}

// Central finite differences of ref_loss with respect to s.
Vec fd_grad(const Vec& s, const std::function<double(const Vec&)>& f) {
  Vec g(s.size());
  const double h = 1e-5;
  for (std::size_t i = 0; i < s.size(); ++i) {
    Vec a = s, b = s;
    a[i] += h;
    b[i] -= h;
    g[i] = (f(a) - f(b)) / (2 * h);
  }
  return g;
}

std::vector<float> to_f(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

struct Result {
  double loss;
  std::vector<float> grad;
};

Result run(const std::vector<float>& s, std::size_t rows, std::size_t vocab, const TeacherTarget& t,
           const LossOptions& o, float scale = 1.0f) {
  Result r;
  r.grad.assign(rows * vocab, NAN);
  r.loss = distill_loss(s.data(), rows, vocab, 0, t, 0, o, r.grad.data(), scale);
  return r;
}

void check_close(const std::vector<float>& got, const Vec& want, double tol) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("index " << i << ": got " << got[i] << ", want " << want[i]);
    CHECK(std::abs(double{got[i]} - want[i]) <= tol);
  }
}

// GV-1 teachers.
const Vec kZ1{2, 1, 0, -1}, kZ2{0.5, 2.5, 0, -0.5}, kZ3{1, 0, 3, 0};
// GV-5 teacher (the mean-logit target) and student.
const Vec kT{7.0 / 6.0, 7.0 / 6.0, 1.0, -0.5}, kS{1.0, 0.5, -0.5, 0.0};

TeacherSignal gv1(int k) {
  const Vec& z = k == 1 ? kZ1 : k == 2 ? kZ2 : kZ3;
  return dense_signal("gv1-" + std::to_string(k), 1, 4, to_f(z));
}

TeacherTarget gv_aggregate(TeacherRule rule, double T, Sharpen sh = Sharpen::kNone,
                           double era_t = 0.1) {
  const TeacherSignal a = gv1(1), b = gv1(2), c = gv1(3);
  TeacherOptions o;
  o.rule = rule;
  o.temperature = T;
  o.sharpen = sh;
  o.era_temperature = era_t;
  return aggregate_teachers({{&a, 1.0}, {&b, 1.0}, {&c, 1.0}}, o);
}

}  // namespace

TEST_CASE(
    "teacher rules: aggregated soft targets of the three golden teachers at T = 1 and T = 2") {
  struct Row {
    TeacherRule rule;
    double T;
    Vec want;
  };
  const std::vector<Row> rows{
      {TeacherRule::kMeanProbs, 1, {0.286768, 0.355445, 0.320566, 0.037221}},
      {TeacherRule::kMeanProbs, 2, {0.284593, 0.310539, 0.290409, 0.114458}},
      {TeacherRule::kEntropyExp, 1, {0.258712, 0.356944, 0.346706, 0.037638}},
      {TeacherRule::kEntropyExp, 2, {0.281028, 0.309350, 0.294872, 0.114750}},
      {TeacherRule::kEntropyInv, 1, {0.252734, 0.355421, 0.354115, 0.037729}},
      {TeacherRule::kEntropyInv, 2, {0.281645, 0.309524, 0.294131, 0.114700}},
      {TeacherRule::kFedETVariance, 1, {0.226356, 0.364315, 0.371218, 0.038111}},
      {TeacherRule::kFedETVariance, 2, {0.259297, 0.305174, 0.319033, 0.116496}},
  };
  for (const Row& r : rows) {
    INFO(teacher_rule_name(r.rule) << " at T = " << r.T);
    const TeacherTarget t = gv_aggregate(r.rule, r.T);
    CHECK(t.kind == TeacherTarget::Kind::kProbs);
    CHECK(t.temperature == r.T);
    check_close(t.values, r.want, 1e-6);
  }
  // mean-logit: the mean logits themselves; softmax at T gives the GV-2 rows.
  const TeacherTarget ml = gv_aggregate(TeacherRule::kMeanLogits, 1);
  CHECK(ml.kind == TeacherTarget::Kind::kLogits);
  check_close(ml.values, {1.166667, 1.166667, 1.0, -0.5}, 1e-6);
  const Vec ml_vals(ml.values.begin(), ml.values.end());
  const Vec p1 = softmax(ml_vals, 1), p2 = softmax(ml_vals, 2);
  check_close(to_f(p1), {0.329451, 0.329451, 0.278874, 0.062225}, 1e-6);
  check_close(to_f(p2), {0.298094, 0.298094, 0.274260, 0.129551}, 1e-6);
}

TEST_CASE("teacher rules: confidence and FedET log-variance weights") {
  const Vec p1 = softmax(kZ1, 1), p2 = softmax(kZ2, 1), p3 = softmax(kZ3, 1);
  check_close(to_f(p1), {0.643914, 0.236883, 0.087144, 0.032059}, 1e-6);
  // GV-4: variances of log-softmax [1.666667, 1.729167, 2.0] -> w = [0.308880, 0.320463,
  // 0.370656]; the target is Σ w_k p_k.
  const Vec w{0.308880, 0.320463, 0.370656};
  Vec want(4);
  for (int i = 0; i < 4; ++i) want[i] = w[0] * p1[i] + w[1] * p2[i] + w[2] * p3[i];
  check_close(gv_aggregate(TeacherRule::kFedETLogVariance, 1).values, want, 2e-6);
  // Confidence: w_k ∝ max_i p_k,i.
  const double c1 = 0.643914, c2 = 0.789137, c3 = 0.809776, cs = c1 + c2 + c3;
  for (int i = 0; i < 4; ++i) want[i] = (c1 * p1[i] + c2 * p2[i] + c3 * p3[i]) / cs;
  check_close(gv_aggregate(TeacherRule::kConfidence, 1).values, want, 2e-6);
}

TEST_CASE("teacher rules: DS-FL entropy reduction on the T = 1 mean-prob vector") {
  check_close(gv_aggregate(TeacherRule::kMeanProbs, 1, Sharpen::kEra, 0.1).values,
              {0.223621, 0.444400, 0.313540, 0.018439}, 1e-6);
  check_close(gv_aggregate(TeacherRule::kMeanProbs, 1, Sharpen::kEra, 0.5).values,
              {0.261489, 0.299990, 0.279776, 0.158745}, 1e-6);
  check_close(gv_aggregate(TeacherRule::kMeanProbs, 1, Sharpen::kEraPower).values,
              {0.262965, 0.404002, 0.328603, 0.004430}, 1e-6);
}

TEST_CASE("Per-client weights scale each client's share") {
  const TeacherSignal a = gv1(1), b = gv1(2);
  TeacherOptions o;
  const TeacherTarget t = aggregate_teachers({{&a, 3.0}, {&b, 1.0}}, o);
  const Vec p1 = softmax(kZ1, 1), p2 = softmax(kZ2, 1);
  Vec want(4);
  for (int i = 0; i < 4; ++i) want[i] = 0.75 * p1[i] + 0.25 * p2[i];
  check_close(t.values, want, 1e-7);
  CHECK(t.clients == std::vector<std::string>{"gv1-1", "gv1-2"});
  o.rule = TeacherRule::kMeanLogits;
  const TeacherTarget m = aggregate_teachers({{&a, 3.0}, {&b, 1.0}}, o);
  for (int i = 0; i < 4; ++i) want[i] = 0.75 * kZ1[i] + 0.25 * kZ2[i];
  check_close(m.values, want, 1e-7);
}

TEST_CASE("distill loss: forward KL, hard-label-free gradients, reverse KL and JSD at T = 2") {
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    INFO("target " << target);
    const TeacherTarget t = logits_target(1, 4, to_f(kT));
    LossOptions o;
    o.temperature = 2;
    o.t_squared = false;
    Result r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.05385102) < 1e-6);
    check_close(r.grad, {0.025919, -0.012784, -0.054482, 0.041347}, 1.5e-6);
    o.t_squared = true;
    r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.21540406) < 2e-6);
    check_close(r.grad, {0.103675, -0.051134, -0.217928, 0.165386}, 1.5e-6);
    o.t_squared = false;
    o.divergence = Divergence::kReverseKL;
    r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.05274772) < 1e-6);
    check_close(r.grad, {0.018823, -0.019407, -0.046207, 0.046791}, 1.5e-6);
    o.divergence = Divergence::kJSD;
    o.beta = 0.5;
    r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.01319970) < 1e-6);
    check_close(r.grad, {0.005566, -0.004032, -0.012323, 0.010789}, 1.5e-6);
    // At β = 0.5 the swapped form has the same weights as the paper form.
    o.divergence = Divergence::kJSDSwapped;
    r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.01319970) < 1e-6);
    // Batchmean scale multiplies the gradient only.
    o.divergence = Divergence::kForwardKL;
    r = run(to_f(kS), 1, 4, t, o, 0.25f);
    CHECK(std::abs(r.loss - 0.05385102) < 1e-6);
    check_close(r.grad, {0.025919 / 4, -0.012784 / 4, -0.054482 / 4, 0.041347 / 4}, 1e-6);
  });
}

TEST_CASE("distill: FedDF mean-prob target at T = 2 gives (q - p̄)/T") {
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    INFO("target " << target);
    const TeacherTarget t = gv_aggregate(TeacherRule::kMeanProbs, 2);
    LossOptions o;
    o.temperature = 2;
    o.t_squared = false;
    const Result r = run(to_f(kS), 1, 4, t, o);
    CHECK(std::abs(r.loss - 0.07470821) < 1e-6);
    check_close(r.grad, {0.032670, -0.019006, -0.062557, 0.048893}, 1.5e-6);
  });
}

TEST_CASE("distill: top-k teachers with K = 2, all four modes") {
  // The GV-5 teacher's top 2 (ids 0 and 1, tied) with the log-sum-exp of t/2 (GV-7).
  const TeacherSignal sig = topk_signal("gv6", 1, 4, 2, {0, 1}, {float(7.0 / 6), float(7.0 / 6)},
                                        TopKValues::kLogits, {1.79367858f}, 2.0);
  struct Row {
    TopKMode mode;
    double loss;
    Vec grad;
  };
  const std::vector<Row> rows{
      {TopKMode::kRenormalize, 0.48186922, {-0.075034, -0.113736, 0.082648, 0.106122}},
      {TopKMode::kSubset, 0.00779224, {0.031088, -0.031088, 0, 0}},
      {TopKMode::kTailBin, 0.00610149, {0.025919, -0.012784, -0.005751, -0.007384}},
  };
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    INFO("target " << target);
    LossOptions lo;
    lo.temperature = 2;
    lo.t_squared = false;
    for (const Row& r : rows) {
      INFO("mode " << topk_mode_name(r.mode));
      TeacherOptions o;
      o.temperature = 2;
      o.topk_mode = r.mode;
      const TeacherTarget t = aggregate_teachers({{&sig, 1.0}}, o);
      CHECK(t.kind == TeacherTarget::Kind::kTopK);
      const Result got = run(to_f(kS), 1, 4, t, lo);
      CHECK(std::abs(got.loss - r.loss) < 1e-6);
      check_close(got.grad, r.grad, 1.5e-6);
    }
    TeacherOptions o;
    o.temperature = 2;
    o.topk_mode = TopKMode::kTruncated;
    const TeacherTarget t = aggregate_teachers({{&sig, 1.0}}, o);
    const Result got = run(to_f(kS), 1, 4, t, lo);
    CHECK(std::abs(got.loss - -0.02106265) < 1e-6);
    // ∂/∂s of Σ_K p log(p/q) = (P q_j - p_j [j in K]) / T, against finite differences.
    const Vec p = softmax(kT, 2);
    const Vec fd = fd_grad(kS, [&](const Vec& s) {
      const Vec q = softmax(s, 2);
      return p[0] * std::log(p[0] / q[0]) + p[1] * std::log(p[1] / q[1]);
    });
    check_close(got.grad, fd, 1e-6);
  });
}

TEST_CASE("Top-k from log-probabilities and from several clients") {
  // Log-probabilities at T = 2 give the same exact tail-bin loss as logits + logsumexp.
  const Vec p = softmax(kT, 2);
  const TeacherSignal lp =
      topk_signal("lp", 1, 4, 2, {1, 0}, {float(std::log(p[1])), float(std::log(p[0]))},
                  TopKValues::kLogProbs, {}, 2.0);
  TeacherOptions o;
  o.temperature = 2;
  o.topk_mode = TopKMode::kTailBin;
  LossOptions lo;
  lo.temperature = 2;
  lo.t_squared = false;
  CHECK(std::abs(run(to_f(kS), 1, 4, aggregate_teachers({{&lp, 1}}, o), lo).loss - 0.00610149) <
        1e-6);
  // Two clients with different ids: the target lists the union, each id's probability the
  // weighted mean with 0 for a client that did not send it.
  const TeacherSignal a = topk_signal("a", 1, 5, 2, {3, 1}, {2.0f, 1.0f});
  const TeacherSignal b = topk_signal("b", 1, 5, 1, {1}, {0.5f});
  o.temperature = 1;
  o.topk_mode = TopKMode::kRenormalize;
  const TeacherTarget t = aggregate_teachers({{&a, 1}, {&b, 1}}, o);
  REQUIRE(t.k == 2);
  CHECK(t.ids == std::vector<std::int32_t>{1, 3});
  const double pa3 = 1.0 / (1.0 + std::exp(-1.0));
  CHECK(std::abs(std::exp(double{t.values[0]}) - 0.5 * ((1 - pa3) + 1.0)) < 1e-7);
  CHECK(std::abs(std::exp(double{t.values[1]}) - 0.5 * pa3) < 1e-7);
  // A row whose union is narrower than the widest row is padded with id -1.
  const TeacherSignal c = topk_signal("c", 2, 5, 1, {4, 2}, {0.0f, 0.0f});
  const TeacherSignal d = topk_signal("d", 2, 5, 1, {4, 3}, {0.0f, 0.0f});
  const TeacherTarget u = aggregate_teachers({{&c, 1}, {&d, 1}}, o);
  CHECK(u.ids == std::vector<std::int32_t>{4, -1, 2, 3});
  const std::vector<float> s(10, 0.0f);
  std::vector<double> losses(2);
  std::vector<float> g(10);
  distill_loss(s.data(), 2, 5, 0, u, 0, LossOptions{}, g.data(), 1.0f, losses.data());
  CHECK(std::abs(losses[0] - std::log(5.0)) < 1e-6);        // KL(one-hot || uniform)
  CHECK(std::abs(losses[1] - std::log(5.0 / 2.0)) < 1e-6);  // KL(half-half || uniform)
}

TEST_CASE(
    "Random rows: every divergence and teacher kind against the double reference, "
    "whose gradient is checked by finite differences") {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd(0.0, 2.0);
  for (const std::size_t vocab : {5, 37, 1000, 3001}) {
    const std::size_t rows = 3;
    Vec s(rows * vocab), t(rows * vocab);
    for (double& x : s) x = nd(rng);
    for (double& x : t) x = nd(rng);
    const TeacherTarget logits = logits_target(rows, vocab, to_f(t));
    // A probability teacher with exact zeros (as renormalised top-k rows have).
    for (const double T : {1.0, 2.5}) {
      std::vector<float> probs(rows * vocab);
      for (std::size_t r = 0; r < rows; ++r) {
        Vec row(t.begin() + r * vocab, t.begin() + (r + 1) * vocab);
        Vec p = softmax(row, T);
        for (std::size_t i = 0; i < vocab; i += 3) p[i] = 0.0;
        double sum = 0;
        for (double x : p) sum += x;
        for (std::size_t i = 0; i < vocab; ++i) probs[r * vocab + i] = float(p[i] / sum);
      }
      const TeacherTarget ptarget = probs_target(rows, vocab, probs, T);
      for (const Divergence d : {Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD,
                                 Divergence::kJSDSwapped}) {
        for (const double beta : {0.0, 0.3, 1.0}) {
          if (beta != 0.3 && (d == Divergence::kForwardKL || d == Divergence::kReverseKL)) continue;
          for (const bool use_probs : {false, true}) {
            if (use_probs && d == Divergence::kReverseKL) continue;  // infinite with zeros
            if (use_probs && d == Divergence::kJSD && beta == 1.0) continue;
            if (use_probs && d == Divergence::kJSDSwapped && beta == 1.0) continue;
            INFO("vocab " << vocab << " T " << T << " " << divergence_name(d) << " beta " << beta
                          << (use_probs ? " probs" : " logits"));
            LossOptions o;
            o.divergence = d;
            o.temperature = T;
            o.beta = beta;
            o.t_squared = true;
            // The reference and its finite differences, once per case.
            Vec want(rows);
            std::vector<Vec> fds(rows);
            for (std::size_t r = 0; r < rows; ++r) {
              const Vec sr(s.begin() + r * vocab, s.begin() + (r + 1) * vocab);
              Vec p(vocab);
              if (use_probs) {
                for (std::size_t i = 0; i < vocab; ++i) p[i] = probs[r * vocab + i];
              } else {
                p = softmax(Vec(t.begin() + r * vocab, t.begin() + (r + 1) * vocab), T);
              }
              auto f = [&](const Vec& x) { return ref_loss(x, p, T, d, beta, true); };
              want[r] = f(sr);
              if (vocab <= 1000) fds[r] = fd_grad(sr, f);
            }
            edgefuse_test::for_each_simd_target([&](const std::string& target) {
              INFO("target " << target);
              std::vector<double> per_row(rows);
              std::vector<float> grad(rows * vocab, NAN);
              const double total =
                  distill_loss(to_f(s).data(), rows, vocab, 0, use_probs ? ptarget : logits, 0, o,
                               grad.data(), 1.0f, per_row.data());
              double want_total = 0.0;
              for (std::size_t r = 0; r < rows; ++r) {
                want_total += want[r];
                CHECK(std::abs(per_row[r] - want[r]) <= 1e-5 * std::max(1.0, std::abs(want[r])));
                for (std::size_t i = 0; i < fds[r].size(); ++i) {
                  INFO("row " << r << " id " << i);
                  CHECK(std::abs(double{grad[r * vocab + i]} - fds[r][i]) <= 2e-6 * T * T);
                }
              }
              CHECK(std::abs(total - want_total) <= 1e-5 * std::max(1.0, want_total));
            });
          }
        }
      }
    }
  }
}

TEST_CASE("Shifting a row's student or teacher logits by a constant changes nothing") {
  const std::size_t vocab = 777;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd(0.0, 3.0);
  Vec s(vocab), t(vocab);
  for (double& x : s) x = nd(rng);
  for (double& x : t) x = nd(rng);
  Vec s2 = s, t2 = t;
  for (double& x : s2) x += 40.0;
  for (double& x : t2) x -= 25.0;
  for (const Divergence d : {Divergence::kForwardKL, Divergence::kReverseKL, Divergence::kJSD}) {
    INFO(divergence_name(d));
    LossOptions o;
    o.divergence = d;
    o.temperature = 2;
    const Result a = run(to_f(s), 1, vocab, logits_target(1, vocab, to_f(t)), o);
    const Result b = run(to_f(s2), 1, vocab, logits_target(1, vocab, to_f(t2)), o);
    CHECK(std::abs(a.loss - b.loss) <= 1e-5 * std::abs(a.loss));
    for (std::size_t i = 0; i < vocab; ++i) {
      CHECK(std::abs(a.grad[i] - b.grad[i]) <= 1e-6);
    }
  }
}

TEST_CASE("Any thread count gives identical bits") {
  const std::size_t rows = 64, vocab = 3000;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> s(rows * vocab), t(rows * vocab);
  for (float& x : s) x = nd(rng);
  for (float& x : t) x = nd(rng);
  const TeacherTarget target = logits_target(rows, vocab, t);
  for (const Divergence d : {Divergence::kForwardKL, Divergence::kJSD}) {
    LossOptions o;
    o.divergence = d;
    o.temperature = 1.5;
    set_num_threads(1);
    const Result one = run(s, rows, vocab, target, o, 1.0f / rows);
    for (const std::size_t n : {2, 3}) {
      set_num_threads(n);
      const Result many = run(s, rows, vocab, target, o, 1.0f / rows);
      CHECK(edgefuse_test::bits_of(float(many.loss)) == edgefuse_test::bits_of(float(one.loss)));
      CHECK(many.loss == one.loss);
      CHECK(std::memcmp(many.grad.data(), one.grad.data(), many.grad.size() * 4) == 0);
    }
    set_num_threads(0);
  }
}

TEST_CASE("A row range of the teacher and a student leading dimension") {
  const std::size_t rows = 4, vocab = 6, ld = 9;
  std::vector<float> t(rows * vocab), s(2 * ld, 123.0f);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = float(std::sin(double(i)));
  for (std::size_t r = 0; r < 2; ++r) {
    for (std::size_t i = 0; i < vocab; ++i) s[r * ld + i] = float(std::cos(double(r * 7 + i)));
  }
  const TeacherTarget target = logits_target(rows, vocab, t);
  std::vector<double> losses(2);
  std::vector<float> g(2 * vocab);
  distill_loss(s.data(), 2, vocab, ld, target, 2, LossOptions{}, g.data(), 1.0f, losses.data());
  for (std::size_t r = 0; r < 2; ++r) {
    const Vec sr(s.begin() + r * ld, s.begin() + r * ld + vocab);
    const Vec tr(t.begin() + (r + 2) * vocab, t.begin() + (r + 3) * vocab);
    CHECK(std::abs(losses[r] - kl(softmax(tr, 1), softmax(sr, 1))) < 1e-6);
  }
}

TEST_CASE("Bad inputs are refused with errors naming the rule") {
  const TeacherTarget t = logits_target(1, 4, to_f(kT));
  std::vector<float> s = to_f(kS), g(4);
  LossOptions o;
  auto loss = [&](std::size_t vocab) {
    distill_loss(s.data(), 1, vocab, 0, t, 0, o, g.data(), 1.0f);
  };
  CHECK(error_of([&] { loss(3); }) ==
        "distill_loss: student vocabulary 3 differs from the "
        "teacher's 4");
  o.temperature = 0;
  CHECK(error_of([&] { loss(4); }) == "distill_loss: temperature T = 0 must be a finite value > 0");
  o.temperature = -1;
  CHECK(error_of([&] { loss(4); }).find("must be a finite value > 0") != std::string::npos);
  o.temperature = 1;
  o.beta = 1.5;
  o.divergence = Divergence::kJSD;
  CHECK(error_of([&] { loss(4); }) == "distill_loss: beta = 1.5 is outside [0, 1]");
  o.beta = -0.1;
  CHECK(error_of([&] { loss(4); }) == "distill_loss: beta = -0.1 is outside [0, 1]");
  o = LossOptions{};
  s[2] = NAN;
  CHECK(error_of([&] { loss(4); }) ==
        "distill_loss: student logit at row 0, id 2 is nan (not finite)");
  s = to_f(kS);
  CHECK(error_of([&] { distill_loss(s.data(), 1, 4, 0, t, 1, o, g.data(), 1.0f); }) ==
        "distill_loss: rows [1, 2) exceed the teacher's 1 rows");
  // Probability targets carry their temperature.
  const TeacherTarget p2 = gv_aggregate(TeacherRule::kMeanProbs, 2);
  CHECK(error_of([&] { distill_loss(s.data(), 1, 4, 0, p2, 0, o, g.data(), 1.0f); }) ==
        "distill_loss: the teacher was aggregated at T = 2 but the loss uses T = 1");
  // Reverse KL against a zero teacher probability is infinite: refused, not NaN.
  const TeacherTarget z = probs_target(1, 4, {0.5f, 0.5f, 0.0f, 0.0f}, 1.0);
  o.divergence = Divergence::kReverseKL;
  CHECK(error_of([&] {
          distill_loss(s.data(), 1, 4, 0, z, 0, o, g.data(), 1.0f);
        }).find("loss of row 0 is inf") != std::string::npos);
  // A top-k mode that needs the full student softmax refuses other divergences.
  const TeacherSignal sig = topk_signal("c", 1, 4, 2, {0, 1}, {1.0f, 0.0f});
  const TeacherTarget tk = aggregate_teachers({{&sig, 1}}, TeacherOptions{});
  CHECK(error_of([&] { distill_loss(s.data(), 1, 4, 0, tk, 0, o, g.data(), 1.0f); }) ==
        "distill_loss: top-k mode renormalize supports forward_kl only (reverse_kl needs the "
        "subset mode)");
  CHECK(error_of([] { parse_divergence("kl"); }) ==
        "unknown divergence 'kl' (valid: forward_kl, reverse_kl, jsd, jsd_swapped)");
}

TEST_CASE("Bad teacher signals: the client is named and its signal rejected") {
  CHECK(error_of([] {
          dense_signal("c1", 1, 4, {1, NAN, 0, 0});
        }) == "teacher signal of client 'c1': logit at row 0, id 1 is nan (not finite)");
  CHECK(error_of([] {
          dense_signal("c1", 2, 4, {1, 2, 3});
        }) == "teacher signal of client 'c1': logits hold 3 values, expected rows x vocab = 2 x 4");
  CHECK(error_of([] {
          topk_signal("c2", 1, 4, 2, {0, 4}, {1, 2});
        }) ==
        "teacher signal of client 'c2': row 0 has id 4 outside the vocabulary [0, 4) (topk_ids)");
  CHECK(error_of([] {
          topk_signal("c2", 1, 4, 2, {0, -1}, {1, 2});
        }) ==
        "teacher signal of client 'c2': row 0 has id -1 outside the vocabulary [0, 4) (topk_ids)");
  CHECK(error_of([] {
          topk_signal("c2", 2, 4, 2, {0, 1, 3, 3}, {1, 2, 1, 2});
        }) == "teacher signal of client 'c2': row 1 repeats id 3 (topk_ids)");
  CHECK(error_of([] { topk_signal("c2", 1, 4, 1, {0}, {INFINITY}); }) ==
        "teacher signal of client 'c2': top-k value at row 0, entry 0 is inf (not finite)");
  CHECK(error_of([] {
          topk_signal("c3", 1, 4, 2, {0, 1}, {-0.1f, -0.1f}, TopKValues::kLogProbs);
        }).find("row 0 has log-probabilities of total mass 1.8") != std::string::npos);
  // Aggregation: vocabularies that disagree, a non-finite client; with a rejected list the
  // bad client is reported and the others aggregated.
  const TeacherSignal a = gv1(1), b = gv1(2);
  TeacherSignal bad = gv1(3);
  bad.client = "nan-client";
  bad.logits[2] = NAN;
  const TeacherSignal other = dense_signal("wide", 1, 5, {0, 0, 0, 0, 0});
  TeacherOptions o;
  CHECK(error_of([&] {
          aggregate_teachers({{&a, 1}, {&other, 1}}, o);
        }) ==
        "aggregate_teachers: client 'wide' rejected: vocabulary size 5 differs from client "
        "'gv1-1''s 4");
  CHECK(error_of([&] {
          aggregate_teachers({{&a, 1}, {&bad, 1}}, o);
        }) ==
        "aggregate_teachers: client 'nan-client' rejected: teacher signal of client "
        "'nan-client': logit at row 0, id 2 is nan (not finite)");
  std::vector<RejectedSignal> rejected;
  const TeacherTarget t =
      aggregate_teachers({{&a, 1}, {&bad, 1}, {&b, 1}, {&other, 1}}, o, &rejected);
  REQUIRE(rejected.size() == 2);
  CHECK(rejected[0].client == "nan-client");
  CHECK(rejected[1].client == "wide");
  CHECK(t.clients == std::vector<std::string>{"gv1-1", "gv1-2"});
  const TeacherTarget ab = aggregate_teachers({{&a, 1}, {&b, 1}}, o);
  CHECK(t.values == ab.values);
  CHECK(error_of([&] {
          aggregate_teachers({{&bad, 1}}, o, &rejected);
        }).find("aggregate_teachers: no valid teacher signal (1 rejected; first: ") == 0);
  // Options.
  o.temperature = 0;
  CHECK(error_of([&] {
          aggregate_teachers({{&a, 1}}, o);
        }) == "aggregate_teachers: temperature = 0 must be a finite value > 0");
  o.temperature = 1;
  CHECK(error_of([&] {
          aggregate_teachers({{&a, NAN}}, o);
        }) == "aggregate_teachers: weight of client 'gv1-1' is nan (must be finite and >= 0)");
  CHECK(error_of([&] {
          aggregate_teachers({{&a, 0}}, o);
        }) == "aggregate_teachers: the accepted clients' weights sum to 0");
  o.rule = TeacherRule::kMeanLogits;
  o.sharpen = Sharpen::kEra;
  CHECK(error_of([&] {
          aggregate_teachers({{&a, 1}}, o);
        }) == "aggregate_teachers: sharpening (era) applies to probability rules, not mean_logits");
  // Top-k: exact modes need exact probabilities at the same temperature.
  const TeacherSignal raw = topk_signal("raw", 1, 4, 2, {0, 1}, {1.0f, 0.0f});
  TeacherOptions to;
  to.topk_mode = TopKMode::kTailBin;
  CHECK(error_of([&] {
          aggregate_teachers({{&raw, 1}}, to);
        }) ==
        "aggregate_teachers: top-k mode tail_bin needs exact probabilities, but client 'raw' "
        "sent logits without logsumexp");
  const TeacherSignal lse =
      topk_signal("lse", 1, 4, 2, {0, 1}, {1.0f, 0.0f}, TopKValues::kLogits, {1.5f}, 1.0);
  to.temperature = 2;
  CHECK(error_of([&] {
          aggregate_teachers({{&lse, 1}}, to);
        }) ==
        "aggregate_teachers: client 'lse' computed its logsumexp at T = 1, but the teacher is "
        "built at T = 2 (top-k mode tail_bin)");
  to.rule = TeacherRule::kEntropyExp;
  to.temperature = 1;
  CHECK(error_of([&] {
          aggregate_teachers({{&lse, 1}}, to);
        }) ==
        "aggregate_teachers: rule entropy_exp needs dense logits; top-k signals aggregate with "
        "mean_probs");
  CHECK(error_of([] { parse_teacher_rule("avg"); }) ==
        "unknown teacher rule 'avg' (valid: mean_logits, mean_probs, entropy_exp, entropy_inv, "
        "confidence, fedet_variance, fedet_log_variance)");
  CHECK(error_of([] { parse_topk_mode("tail"); }) ==
        "unknown top-k mode 'tail' (valid: renormalize, subset, tail_bin, truncated)");
}

TEST_CASE("top_k_of keeps the largest logits, ties to the lower id, with the row's lse") {
  const TeacherSignal d = dense_signal("d", 2, 5, {1, 3, 3, -2, 0, 5, 4, 3, 2, 1});
  const TeacherSignal k = top_k_of(d, 2, true, 2.0);
  CHECK(k.ids == std::vector<std::int32_t>{1, 2, 0, 1});
  CHECK(k.values == std::vector<float>{3, 3, 5, 4});
  double sum = 0;
  for (double z : {1.0, 3.0, 3.0, -2.0, 0.0}) sum += std::exp(z / 2);
  CHECK(std::abs(double{k.logsumexp[0]} - std::log(sum)) < 1e-6);
  CHECK(k.temperature == 2.0);
}

TEST_CASE("Every rule, sharpening, top-k mode and divergence name parses back") {
  for (int i = 0; i < 7; ++i) {
    CHECK(parse_teacher_rule(teacher_rule_name(TeacherRule(i))) == TeacherRule(i));
  }
  for (int i = 0; i < 3; ++i) CHECK(parse_sharpen(sharpen_name(Sharpen(i))) == Sharpen(i));
  for (int i = 0; i < 4; ++i) CHECK(parse_topk_mode(topk_mode_name(TopKMode(i))) == TopKMode(i));
  for (int i = 0; i < 4; ++i) {
    CHECK(parse_divergence(divergence_name(Divergence(i))) == Divergence(i));
  }
}
