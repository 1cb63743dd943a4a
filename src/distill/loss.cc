// The fused distillation loss (distill/loss.h): row logic on the SIMD row primitives of
// src/kernels/distill_rows.h.
#include "edgefuse/distill/loss.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "src/kernels/nonfinite.h"
#include "src/kernels/distill_rows.h"

namespace edgefuse {
namespace {

constexpr std::array<std::string_view, 4> kDivergenceNames{"forward_kl", "reverse_kl", "jsd",
                                                           "jsd_swapped"};

// The divergence a row computes, endpoints of the JSD forms resolved.
struct RowSpec {
  Divergence divergence;
  float inv_t;
  double loss_factor;  // T² or 1
  double grad_c;       // grad_scale * (T or 1/T)
  double beta, a, b;   // JSD: M = beta p + (1-beta) q, loss = a KL(p||M) + b KL(q||M)
};

struct Scratch {
  std::vector<float> es, et, lt, sk, gk;
};

// Loss of one dense row (student s, teacher tv in log space scaled by st); writes grad when
// not null. es/et are n-float scratch (es may be grad).
double dense_row(const detail::DistillRowKernels& k, const RowSpec& spec, const float* s,
                 const float* tv, float st, std::size_t n, float* grad, float* es, float* et) {
  const float ms = k.row_max(s, n);
  const float mt = k.row_max(tv, n);
  double ts[2], ss[2];
  const bool fwd = spec.divergence == Divergence::kForwardKL;
  const bool rev = spec.divergence == Divergence::kReverseKL;
  k.exp_sum(tv, st, fwd ? s : nullptr, spec.inv_t, mt, n, et, ts);
  k.exp_sum(s, spec.inv_t, rev ? tv : nullptr, st, ms, n, es, ss);
  const double zt = ts[0], zs = ss[0];
  const double lse_t = double{mt} * st + std::log(zt);
  const double lse_s = double{ms} * spec.inv_t + std::log(zs);
  double loss;
  if (fwd) {
    loss = ts[1] / zt - lse_t + lse_s;
    if (grad != nullptr) {
      k.combine(es, static_cast<float>(spec.grad_c / zs), et, static_cast<float>(spec.grad_c / zt),
                n, grad);
    }
  } else if (rev) {
    loss = ss[1] / zs - lse_s + lse_t;
    if (grad != nullptr) {
      k.scaled_diff_grad(es, s, spec.inv_t, tv, st, n, static_cast<float>(spec.grad_c / zs),
                         static_cast<float>(lse_s - lse_t + loss), grad);
    }
  } else {
    const std::array<float, 8> params{
        static_cast<float>(1.0 / zs),  static_cast<float>(1.0 / zt),
        static_cast<float>(lse_s),     static_cast<float>(lse_t),
        static_cast<float>(spec.beta), static_cast<float>(1.0 - spec.beta),
        static_cast<float>(spec.a),    static_cast<float>(spec.b)};
    double js[3];
    k.jsd_pass(es, et, s, spec.inv_t, tv, st, n, params.data(), js);
    loss = spec.a * js[0] + spec.b * js[1];
    if (grad != nullptr) {
      k.scaled_grad(es, et, n, static_cast<float>(spec.grad_c / zs), static_cast<float>(js[2]),
                    grad);
    }
  }
  return loss * spec.loss_factor;
}

// Loss of one row against a top-k teacher (ids with -1 padding, log-probabilities lp).
double topk_row(const detail::DistillRowKernels& k, const RowSpec& spec, TopKMode mode,
                const float* s, std::size_t vocab, const std::int32_t* ids, const float* lp,
                std::size_t width, float* grad, Scratch& sc, std::size_t row) {
  std::size_t nk = 0;
  while (nk < width && ids[nk] >= 0) ++nk;
  const double c = spec.grad_c;
  if (mode == TopKMode::kSubset) {
    sc.sk.resize(nk);
    sc.gk.resize(nk);
    for (std::size_t j = 0; j < nk; ++j) sc.sk[j] = s[ids[j]];
    // sc.es and sc.et hold vocab >= nk floats.
    const double loss =
        dense_row(k, spec, sc.sk.data(), lp, 1.0f, nk, grad != nullptr ? sc.gk.data() : nullptr,
                  sc.es.data(), sc.et.data());
    if (grad != nullptr) {
      std::fill(grad, grad + vocab, 0.0f);
      for (std::size_t j = 0; j < nk; ++j) grad[ids[j]] = sc.gk[j];
    }
    return loss;
  }
  // The student's full softmax: es = exp(u - m_s), lse_s.
  float* es = grad != nullptr ? grad : sc.es.data();
  const float ms = k.row_max(s, vocab);
  double ss[2];
  k.exp_sum(s, spec.inv_t, nullptr, 0.0f, ms, vocab, es, ss);
  const double zs = ss[0];
  const double lse_s = double{ms} * spec.inv_t + std::log(zs);
  auto log_q = [&](std::size_t j) { return double{s[ids[j]]} * spec.inv_t - lse_s; };
  double loss = 0.0;
  if (mode == TopKMode::kRenormalize) {
    double m = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < nk; ++j) m = std::max(m, double{lp[j]});
    double sum = 0.0;
    for (std::size_t j = 0; j < nk; ++j) sum += std::exp(double{lp[j]} - m);
    const double lse_k = m + std::log(sum);
    if (grad != nullptr) k.combine(es, static_cast<float>(c / zs), es, 0.0f, vocab, grad);
    for (std::size_t j = 0; j < nk; ++j) {
      const double lpt = double{lp[j]} - lse_k;
      const double p = std::exp(lpt);
      if (p > 0.0) loss += p * (lpt - log_q(j));
      if (grad != nullptr) grad[ids[j]] = static_cast<float>(grad[ids[j]] - c * p);
    }
    return loss * spec.loss_factor;
  }
  double p_mass = 0.0, q_mass = 0.0;
  for (std::size_t j = 0; j < nk; ++j) {
    const double p = std::exp(double{lp[j]});
    p_mass += p;
    q_mass += std::exp(log_q(j));
    if (p > 0.0) loss += p * (double{lp[j]} - log_q(j));
  }
  if (mode == TopKMode::kTruncated) {
    if (grad != nullptr) {
      k.combine(es, static_cast<float>(c * p_mass / zs), es, 0.0f, vocab, grad);
      for (std::size_t j = 0; j < nk; ++j) {
        grad[ids[j]] = static_cast<float>(grad[ids[j]] - c * std::exp(double{lp[j]}));
      }
    }
    return loss * spec.loss_factor;
  }
  // Tail bin.
  double p_tail = 1.0 - p_mass;
  if (p_tail < 0.0) {
    if (p_tail < -1e-5) {
      detail::fail("distill_loss: row ", row, ": teacher probabilities on the top-k ids sum to ",
                   p_mass, " > 1 (tail_bin)");
    }
    p_tail = 0.0;
  }
  const double q_tail = std::max(0.0, 1.0 - q_mass);
  if (p_tail > 0.0) {
    if (q_tail == 0.0) {
      detail::fail("distill_loss: row ", row, ": the student puts no mass outside the top-k ids ",
                   "but the teacher puts ", p_tail, " there; tail_bin KL is infinite");
    }
    loss += p_tail * (std::log(p_tail) - std::log(q_tail));
  }
  if (grad != nullptr) {
    const double ratio = q_tail > 0.0 ? p_tail / q_tail : 0.0;
    k.combine(es, static_cast<float>(c * (1.0 - ratio) / zs), es, 0.0f, vocab, grad);
    for (std::size_t j = 0; j < nk; ++j) {
      grad[ids[j]] = static_cast<float>(c * (std::exp(log_q(j)) - std::exp(double{lp[j]})));
    }
  }
  return loss * spec.loss_factor;
}

}  // namespace

std::string_view divergence_name(Divergence d) noexcept {
  return kDivergenceNames[static_cast<std::size_t>(d)];
}

Divergence parse_divergence(std::string_view name) {
  for (std::size_t i = 0; i < kDivergenceNames.size(); ++i) {
    if (kDivergenceNames[i] == name) return static_cast<Divergence>(i);
  }
  detail::fail("unknown divergence '", name, "' (valid: forward_kl, reverse_kl, jsd, jsd_swapped)");
}

double distill_loss(const float* student, std::size_t rows, std::size_t vocab, std::size_t ld,
                    const TeacherTarget& teacher, std::size_t first_row, const LossOptions& options,
                    float* grad, float grad_scale, double* row_losses) {
  constexpr const char* kFn = "distill_loss";
  const double T = options.temperature;
  if (!(T > 0.0) || !std::isfinite(T)) {
    detail::fail(kFn, ": temperature T = ", T, " must be a finite value > 0");
  }
  if (!(options.beta >= 0.0 && options.beta <= 1.0)) {
    detail::fail(kFn, ": beta = ", options.beta, " is outside [0, 1]");
  }
  if (!std::isfinite(grad_scale)) detail::fail(kFn, ": grad_scale = ", grad_scale);
  if (ld == 0) ld = vocab;
  if (ld < vocab) detail::fail(kFn, ": ld = ", ld, " is less than vocab = ", vocab);
  if (vocab != teacher.vocab) {
    detail::fail(kFn, ": student vocabulary ", vocab, " differs from the teacher's ",
                 teacher.vocab);
  }
  if (first_row > teacher.rows || rows > teacher.rows - first_row) {
    detail::fail(kFn, ": rows [", first_row, ", ", first_row + rows, ") exceed the teacher's ",
                 teacher.rows, " rows");
  }
  if (teacher.kind != TeacherTarget::Kind::kLogits && teacher.temperature != T) {
    detail::fail(kFn, ": the teacher was aggregated at T = ", teacher.temperature,
                 " but the loss uses T = ", T);
  }
  RowSpec spec{options.divergence,
               static_cast<float>(1.0 / T),
               options.t_squared ? T * T : 1.0,
               double{grad_scale} * (options.t_squared ? T : 1.0 / T),
               options.beta,
               0.0,
               0.0};
  if (spec.divergence == Divergence::kJSD || spec.divergence == Divergence::kJSDSwapped) {
    const bool paper = spec.divergence == Divergence::kJSD;
    if (options.beta == 0.0) {
      spec.divergence = Divergence::kForwardKL;
    } else if (options.beta == 1.0) {
      spec.divergence = Divergence::kReverseKL;
    } else {
      spec.a = paper ? options.beta : 1.0 - options.beta;
      spec.b = paper ? 1.0 - options.beta : options.beta;
    }
  }
  const bool topk = teacher.kind == TeacherTarget::Kind::kTopK;
  if (topk && teacher.topk_mode != TopKMode::kSubset &&
      options.divergence != Divergence::kForwardKL) {
    detail::fail(kFn, ": top-k mode ", topk_mode_name(teacher.topk_mode), " supports forward_kl",
                 " only (", divergence_name(options.divergence), " needs the subset mode)");
  }
  if (rows == 0 || vocab == 0) return 0.0;
  if (student == nullptr) detail::fail(kFn, ": student is null");
  const detail::DistillRowKernels k = detail::distill_row_kernels();
  std::vector<double> losses(rows);
  const std::size_t grain = std::max<std::size_t>(1, (std::size_t{1} << 16) / vocab);
  parallel_for(rows, grain, [&](std::size_t b, std::size_t e) {
    Scratch sc;
    sc.es.resize(vocab);
    sc.et.resize(vocab);
    if (teacher.kind == TeacherTarget::Kind::kProbs) sc.lt.resize(vocab);
    for (std::size_t r = b; r < e; ++r) {
      const float* s = student + r * ld;
      const std::size_t bad = detail::first_nonfinite_bits(
          reinterpret_cast<const std::uint32_t*>(s), vocab, std::uint32_t{0x7F800000u});
      if (bad != detail::kNoIndex) {
        detail::fail(kFn, ": student logit at row ", r, ", id ", bad, " is ", s[bad],
                     " (not finite)");
      }
      const std::size_t tr = first_row + r;
      float* g = grad != nullptr ? grad + r * vocab : nullptr;
      double loss;
      if (topk) {
        loss = topk_row(k, spec, teacher.topk_mode, s, vocab, teacher.ids.data() + tr * teacher.k,
                        teacher.values.data() + tr * teacher.k, teacher.k, g, sc, tr);
      } else {
        const float* t = teacher.values.data() + tr * vocab;
        float st = spec.inv_t;
        if (teacher.kind == TeacherTarget::Kind::kProbs) {
          k.log(t, vocab, sc.lt.data());
          t = sc.lt.data();
          st = 1.0f;
        }
        loss =
            dense_row(k, spec, s, t, st, vocab, g, g != nullptr ? g : sc.es.data(), sc.et.data());
      }
      if (!std::isfinite(loss)) {
        detail::fail(kFn, ": the ", divergence_name(options.divergence), " loss of row ", tr,
                     " is ", loss, " (the teacher gives probability 0 where the student does not)");
      }
      losses[r] = loss;
    }
  });
  double total = 0.0;
  for (std::size_t r = 0; r < rows; ++r) total += losses[r];
  if (row_losses != nullptr) std::copy(losses.begin(), losses.end(), row_losses);
  return total;
}

}  // namespace edgefuse
