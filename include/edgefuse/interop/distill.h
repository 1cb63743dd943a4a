// edgefuse/interop/distill.h — the fused distillation loss (distill/loss.h) as a LibTorch
// autograd function, and a Distiller that trains a student nn::Module on proxy batches against
// an aggregated teacher (distill/teacher.h).
//
// The autograd function follows the Liger-Kernel pattern: forward runs
// the fused kernel once, which yields the loss and its gradient together; the gradient is kept
// and backward only multiplies it by the upstream scalar. The loss is the batch mean of the
// row losses ("batchmean", the reduction FedDF, DS-FL and FedGKT use): rows are the leading
// dimensions of the student logits flattened, vocabulary the last.
//
// The Distiller mixes hard labels Hinton-style (FedGKT, FedMKT):
//   L = alpha * CE(labels, softmax(s)) + (1 - alpha) * L_KD(T),
// with L_KD carrying T² by default (LossOptions::t_squared) so the balance does not move with T.
//
//   edgefuse::TeacherTarget teacher = edgefuse::aggregate_teachers(signals, topts);
//   torch::optim::Adam opt(model->parameters(), 1e-3);
//   edgefuse::Distiller d([&](const torch::Tensor& x) { return model->forward(x); }, opt, dopts);
//   for (int e = 0; e < epochs; ++e) d.epoch(proxy_inputs, teacher, proxy_labels);
#pragma once

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "edgefuse/distill/loss.h"
#include "edgefuse/distill/teacher.h"

namespace edgefuse {

// The loss as an autograd Function. apply(student, &teacher, first_row, options): student
// logits [..., vocab] (f32, bf16, f16 or f64; computed in f32) for teacher rows
// [first_row, first_row + rows). The teacher must outlive the backward pass.
class DistillLossFunction : public torch::autograd::Function<DistillLossFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor student,
                               const TeacherTarget* teacher, std::int64_t first_row,
                               LossOptions options);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_output);
};

// Batch-mean distillation loss of `student` against rows [first_row, ...) of `teacher`, a
// scalar with autograd. Throws Error (distill_loss's rules; a student not on the CPU).
torch::Tensor distill_loss(const torch::Tensor& student, const TeacherTarget& teacher,
                           std::size_t first_row, const LossOptions& options);

struct DistillerOptions {
  LossOptions loss;
  double alpha = 0.0;            // weight of the hard-label cross-entropy, in [0, 1]
  std::size_t batch_rows = 256;  // proxy rows per optimizer step
  double clip_grad_norm = 0.0;   // > 0: clip the parameters' global gradient norm
  bool shuffle = true;           // new row order each epoch, from `seed` and the epoch number
  std::uint64_t seed = 0;
};

struct DistillStats {
  double loss = 0.0;  // mean over the rows seen of the mixed loss
  double kd = 0.0;    // ... of the distillation term
  double ce = 0.0;    // ... of the hard-label cross-entropy (0 without labels)
  std::size_t rows = 0;
  std::size_t steps = 0;
};

// Trains a student against a teacher: forward maps a batch of inputs to logits [batch, vocab].
class Distiller {
 public:
  using Forward = std::function<torch::Tensor(const torch::Tensor& inputs)>;

  // Throws Error for alpha outside [0, 1], batch_rows 0, a negative clip norm, or options the
  // loss refuses (checked on the first step).
  Distiller(Forward forward, torch::optim::Optimizer& optimizer, DistillerOptions options);

  // One optimizer step on inputs [b, ...] against teacher rows [first_row, first_row + b);
  // labels (int64 [b]) only when alpha > 0.
  DistillStats step(const torch::Tensor& inputs, const TeacherTarget& teacher,
                    std::size_t first_row, const torch::Tensor& labels = {});

  // One pass over the proxy set (inputs[i] is the teacher's row i) in batches of batch_rows.
  DistillStats epoch(const torch::Tensor& inputs, const TeacherTarget& teacher,
                     const torch::Tensor& labels = {});

  std::size_t epochs_done() const noexcept { return epochs_; }

 private:
  Forward forward_;
  torch::optim::Optimizer& optimizer_;
  DistillerOptions options_;
  std::size_t epochs_ = 0;
};

}  // namespace edgefuse
