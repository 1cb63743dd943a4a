// edgefuse/distill/loss.h — the fused distillation loss: per row of student logits, the
// divergence from an aggregated teacher (distill/teacher.h) and its gradient with respect to
// the student logits, from one SIMD pass structure with no softmax materialised.
//
// With u = s/T, v = t/T, q = softmax(u), p = softmax(v):
//   forward_kl   L = KL(p || q) = Σ p (v - u) - lse(v) + lse(u);  ∂L/∂s = (q - p)/T
//                (Hinton KD, FedDF, FedGKT, DS-FL; soft cross-entropy has the same gradient)
//   reverse_kl   R = KL(q || p);  ∂R/∂s_j = q_j (log q_j - log p_j - R)/T        (MiniLLM)
//   jsd          GKD's generalized JSD, M = βp + (1-β)q, J = β KL(p||M) + (1-β) KL(q||M);
//                ∂J/∂s_j = (1-β) q_j (log(q_j/M_j) - KL(q||M))/T. It vanishes at β = 0 and
//                1, so there, as TRL does since PR #3043, β = 0 is forward_kl and β = 1
//                reverse_kl.
//   jsd_swapped  ms-swift's form: same M, J = (1-β) KL(p||M) + β KL(q||M); continuous, equal to
//                forward_kl at β = 0 and reverse_kl at β = 1.
// `t_squared` multiplies loss and gradient by T² (Hinton's factor, keeps the balance with a
// hard-label term independent of T); FedDF, DS-FL and FedMKT leave it out.
//
// Each row is computed in a fixed order by one thread: two max reductions, two exp passes
// (Σ exp kept in f32 lanes per 1024-entry block, blocks summed in double) and one gradient
// pass; the loss is KL = A/Z_t - lse_t + lse_s. Results are bitwise identical for any
// thread count; across SIMD targets they agree to float rounding.
//
// Top-k teachers follow the target's TopKMode: renormalize, tail_bin and truncated with
// forward_kl only (the student side is the full softmax), subset with any divergence (both
// sides over the teacher's ids, zero gradient elsewhere).
//
//   std::vector<float> grad(rows * vocab);
//   double sum = edgefuse::distill_loss(student, rows, vocab, teacher, 0, opts, grad.data(),
//                                       1.0f / rows);   // batchmean gradient
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "edgefuse/distill/teacher.h"

namespace edgefuse {

enum class Divergence : std::uint8_t { kForwardKL, kReverseKL, kJSD, kJSDSwapped };

// "forward_kl", "reverse_kl", "jsd", "jsd_swapped".
std::string_view divergence_name(Divergence d) noexcept;
Divergence parse_divergence(std::string_view name);

struct LossOptions {
  Divergence divergence = Divergence::kForwardKL;
  double temperature = 1.0;  // > 0; must equal the target's for probability and top-k targets
  bool t_squared = true;
  double beta = 0.5;  // jsd, jsd_swapped: in [0, 1]
};

// Loss of rows [first_row, first_row + rows) of `teacher` for student logits `student`
// (rows x vocab, f32, row-major, leading dimension `ld` >= vocab; 0 means vocab). Writes
// row_losses[i] (if not null) and grad (rows x vocab, leading dimension vocab, if not null)
// = grad_scale * ∂loss_i/∂student_i, and returns Σ row losses (in double, summed in row
// order). Throws Error naming the rule broken: vocabulary that disagrees with the teacher's,
// rows beyond it, a non-finite student logit (row and column named), T <= 0 or a temperature
// that differs from the target's, β outside [0, 1], a divergence the top-k mode does not
// support, or a loss that is infinite (reverse KL against a teacher probability of 0).
double distill_loss(const float* student, std::size_t rows, std::size_t vocab, std::size_t ld,
                    const TeacherTarget& teacher, std::size_t first_row, const LossOptions& options,
                    float* grad, float grad_scale, double* row_losses = nullptr);

}  // namespace edgefuse
