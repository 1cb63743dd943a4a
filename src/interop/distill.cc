// LibTorch distillation: the fused loss as an autograd Function and the Distiller
// (edgefuse/interop/distill.h).
#include "edgefuse/interop/distill.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "edgefuse/core/error.h"

namespace edgefuse {

torch::Tensor DistillLossFunction::forward(torch::autograd::AutogradContext* ctx,
                                           torch::Tensor student, const TeacherTarget* teacher,
                                           std::int64_t first_row, LossOptions options) {
  constexpr const char* kFn = "distill_loss";
  if (teacher == nullptr) detail::fail(kFn, ": teacher is null");
  if (!student.defined() || student.dim() < 1) detail::fail(kFn, ": student logits are empty");
  if (!student.device().is_cpu()) detail::fail(kFn, ": student logits must be on the CPU");
  if (first_row < 0) detail::fail(kFn, ": first_row = ", first_row);
  const std::int64_t vocab = student.size(-1);
  const torch::Tensor s = student.detach().to(torch::kFloat).reshape({-1, vocab}).contiguous();
  const auto rows = static_cast<std::size_t>(s.size(0));
  const bool want_grad = student.requires_grad();
  torch::Tensor grad = want_grad ? torch::empty_like(s) : torch::Tensor();
  const double sum = edgefuse::distill_loss(
      s.data_ptr<float>(), rows, static_cast<std::size_t>(vocab), 0, *teacher,
      static_cast<std::size_t>(first_row), options, want_grad ? grad.data_ptr<float>() : nullptr,
      rows == 0 ? 0.0f : static_cast<float>(1.0 / static_cast<double>(rows)));
  if (want_grad) ctx->save_for_backward({grad});
  ctx->saved_data["dtype"] = static_cast<std::int64_t>(student.scalar_type());
  ctx->saved_data["shape"] = student.sizes().vec();
  const double mean = rows == 0 ? 0.0 : sum / static_cast<double>(rows);
  return torch::scalar_tensor(mean, student.options().requires_grad(false));
}

torch::autograd::variable_list DistillLossFunction::backward(
    torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_output) {
  const auto saved = ctx->get_saved_variables();
  const auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
  const auto shape = ctx->saved_data["shape"].toIntVector();
  torch::Tensor g = saved.at(0).mul(grad_output.at(0).to(torch::kFloat)).reshape(shape).to(dtype);
  return {g, torch::Tensor(), torch::Tensor(), torch::Tensor()};
}

torch::Tensor distill_loss(const torch::Tensor& student, const TeacherTarget& teacher,
                           std::size_t first_row, const LossOptions& options) {
  return DistillLossFunction::apply(student, &teacher, static_cast<std::int64_t>(first_row),
                                    options);
}

Distiller::Distiller(Forward forward, torch::optim::Optimizer& optimizer, DistillerOptions options)
    : forward_(std::move(forward)), optimizer_(optimizer), options_(options) {
  constexpr const char* kFn = "Distiller";
  if (!forward_) detail::fail(kFn, ": forward is empty");
  if (!(options_.alpha >= 0.0 && options_.alpha <= 1.0)) {
    detail::fail(kFn, ": alpha = ", options_.alpha, " is outside [0, 1]");
  }
  if (options_.batch_rows == 0) detail::fail(kFn, ": batch_rows = 0");
  if (!(options_.clip_grad_norm >= 0.0) || !std::isfinite(options_.clip_grad_norm)) {
    detail::fail(kFn, ": clip_grad_norm = ", options_.clip_grad_norm);
  }
}

DistillStats Distiller::step(const torch::Tensor& inputs, const TeacherTarget& teacher,
                             std::size_t first_row, const torch::Tensor& labels) {
  const auto b = static_cast<std::size_t>(inputs.size(0));
  if (options_.alpha > 0.0) {
    if (!labels.defined()) detail::fail("Distiller: alpha > 0 needs hard labels");
    if (labels.dim() != 1 || static_cast<std::size_t>(labels.size(0)) != b) {
      detail::fail("Distiller: labels of sizes ", labels.sizes(), " for ", b, " rows");
    }
  }
  optimizer_.zero_grad();
  const torch::Tensor logits = forward_(inputs);
  if (logits.dim() != 2 || static_cast<std::size_t>(logits.size(0)) != b) {
    detail::fail("Distiller: forward returned logits of sizes ", logits.sizes(), " for ", b,
                 " inputs (expected [", b, ", vocab])");
  }
  const torch::Tensor kd = distill_loss(logits, teacher, first_row, options_.loss);
  torch::Tensor loss = kd;
  torch::Tensor ce;
  if (options_.alpha > 0.0) {
    ce = torch::nn::functional::cross_entropy(logits.to(torch::kFloat), labels);
    loss = options_.alpha * ce + (1.0 - options_.alpha) * kd;
  }
  loss.backward();
  if (options_.clip_grad_norm > 0.0) {
    std::vector<torch::Tensor> params;
    for (const auto& group : optimizer_.param_groups()) {
      for (const auto& p : group.params()) params.push_back(p);
    }
    torch::nn::utils::clip_grad_norm_(params, options_.clip_grad_norm);
  }
  optimizer_.step();
  DistillStats st;
  st.rows = b;
  st.steps = 1;
  st.loss = loss.item<double>();
  st.kd = kd.item<double>();
  st.ce = ce.defined() ? ce.item<double>() : 0.0;
  return st;
}

DistillStats Distiller::epoch(const torch::Tensor& inputs, const TeacherTarget& teacher,
                              const torch::Tensor& labels) {
  const auto n = static_cast<std::size_t>(inputs.size(0));
  if (n != teacher.rows) {
    detail::fail("Distiller: ", n, " proxy inputs but the teacher has ", teacher.rows, " rows");
  }
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (options_.shuffle) {
    std::mt19937_64 rng(options_.seed * 0x9E3779B97F4A7C15ull + epochs_);
    // Fisher-Yates with our own index draw, so the order is the same with any standard library.
    for (std::size_t i = n; i > 1; --i) {
      std::swap(order[i - 1], order[rng() % i]);
    }
  }
  DistillStats total;
  for (std::size_t b = 0; b < n; b += options_.batch_rows) {
    const std::size_t e = std::min(n, b + options_.batch_rows);
    DistillStats st;
    if (options_.shuffle) {
      const std::vector<std::int64_t> idx(order.begin() + static_cast<std::ptrdiff_t>(b),
                                          order.begin() + static_cast<std::ptrdiff_t>(e));
      const torch::Tensor ti = torch::tensor(idx, torch::kLong);
      const std::vector<std::size_t> rows(idx.begin(), idx.end());
      const TeacherTarget batch_teacher = select_rows(teacher, rows);
      st = step(inputs.index_select(0, ti), batch_teacher, 0,
                labels.defined() ? labels.index_select(0, ti) : labels);
    } else {
      const auto bi = static_cast<std::int64_t>(b), ei = static_cast<std::int64_t>(e);
      st = step(inputs.slice(0, bi, ei), teacher, b,
                labels.defined() ? labels.slice(0, bi, ei) : labels);
    }
    const auto w = static_cast<double>(st.rows);
    total.loss += st.loss * w;
    total.kd += st.kd * w;
    total.ce += st.ce * w;
    total.rows += st.rows;
    total.steps += 1;
  }
  if (total.rows > 0) {
    total.loss /= static_cast<double>(total.rows);
    total.kd /= static_cast<double>(total.rows);
    total.ce /= static_cast<double>(total.rows);
  }
  ++epochs_;
  return total;
}

}  // namespace edgefuse
