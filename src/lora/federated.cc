// Federated LoRA rules and lifting (lora/federated.h).
#include "edgefuse/lora/federated.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "edgefuse/core/error.h"
#include "edgefuse/lora/combine.h"
#include "src/plan/slicing.h"
#include "src/lora/lora_util.h"
#include "src/lora/operands.h"

namespace edgefuse {

using detail::fail;
using detail::MatD;

namespace {

constexpr struct {
  FederatedRule rule;
  const char* name;
} kRules[] = {
    {FederatedRule::kFedIt, "fedit"},          {FederatedRule::kFfaLora, "ffa-lora"},
    {FederatedRule::kFlora, "flora"},          {FederatedRule::kHetLora, "hetlora"},
    {FederatedRule::kFlexLora, "flexlora"},    {FederatedRule::kFedExLora, "fedex-lora"},
    {FederatedRule::kFedSaLora, "fedsa-lora"}, {FederatedRule::kLoraFairLs, "lora-fair-ls"}};

struct Part {
  std::size_t client;
  const LoraModule* m;
};

// A (r×in) padded with zero rows / B (out×r) with zero columns to rank R.
MatD padded_a(const LoraModule& m, Eigen::Index R) {
  MatD a = MatD::Zero(R, static_cast<Eigen::Index>(m.in_features()));
  a.topRows(static_cast<Eigen::Index>(m.rank())) = detail::to_mat(m.a);
  return a;
}
MatD padded_b(const LoraModule& m, Eigen::Index R) {
  MatD b = MatD::Zero(static_cast<Eigen::Index>(m.out_features()), R);
  b.leftCols(static_cast<Eigen::Index>(m.rank())) = detail::to_mat(m.b);
  return b;
}

LoraModule with_factors(const LoraModule& like, const MatD& a, const MatD& b, double scaling) {
  LoraModule out;
  out.module = like.module;
  out.kind = like.kind;
  out.fan_in_fan_out = like.fan_in_fan_out;
  out.a = detail::to_tensor(a);
  out.b = detail::to_tensor(b);
  out.scaling = scaling;
  return out;
}

// FLoRA's stack into the first Σ r_k rows of a and columns of b: a = [p_k·s_k·A_k; …],
// b = [B_k | …], so b·a = Σ p_k·s_k·B_k·A_k.
void stack_factors(const std::vector<Part>& parts, const std::vector<double>& p, MatD& a, MatD& b) {
  Eigen::Index at = 0;
  for (const auto& x : parts) {
    const auto r = static_cast<Eigen::Index>(x.m->rank());
    a.middleRows(at, r) = (p[x.client] * x.m->scaling) * detail::to_mat(x.m->a);
    b.middleCols(at, r) = detail::to_mat(x.m->b);
    at += r;
  }
}

// ‖B·A‖_F from the r×r Gram matrices: ‖BA‖² = tr((BᵀB)(AAᵀ)).
double product_norm(const LoraModule& m) {
  const MatD a = detail::to_mat(m.a), b = detail::to_mat(m.b);
  const MatD gb = b.transpose() * b, ga = a * a.transpose();
  return std::sqrt(std::max(0.0, (gb.cwiseProduct(ga.transpose())).sum()));
}

}  // namespace

FederatedRule parse_federated_rule(std::string_view name) {
  if (name == "ffa") return FederatedRule::kFfaLora;
  std::string valid;
  for (const auto& r : kRules) {
    if (name == r.name) return r.rule;
    valid += valid.empty() ? "" : ", ";
    valid += r.name;
  }
  fail("unknown federated LoRA rule '", name, "' (valid: ", valid, ")");
}

const char* federated_rule_name(FederatedRule rule) {
  for (const auto& r : kRules) {
    if (r.rule == rule) return r.name;
  }
  return "?";
}

FederatedLora federated_lora(FederatedRule rule, const std::vector<ClientLora>& clients) {
  const char* fn = federated_rule_name(rule);
  if (std::string(fn) == "?") fail("federated_lora: unknown rule ", static_cast<int>(rule));
  if (clients.empty()) fail(fn, ": no client adapters");
  double total = 0;
  for (const auto& c : clients) {
    if (c.adapter == nullptr) fail(fn, ": a client adapter is null");
    if (!std::isfinite(c.weight) || c.weight < 0) {
      fail(fn, ": client '", c.adapter->label, "' has weight ", c.weight,
           " (weights must be finite and >= 0)");
    }
    total += c.weight;
  }
  if (!(total > 0)) fail(fn, ": the client weights are all zero");
  std::vector<double> p;
  for (const auto& c : clients) p.push_back(c.weight / total);

  std::map<std::string, std::vector<Part>> by_module;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    detail::reject_dora(fn, *clients[k].adapter);
    for (const auto& m : clients[k].adapter->modules) by_module[m.module].push_back({k, &m});
  }
  FederatedLora out;
  out.global.config = clients.front().adapter->config;
  out.global.label = std::string(fn) + " aggregate";
  for (const auto& c : clients) {
    LoraAdapter a;
    a.config = c.adapter->config;
    a.label = c.adapter->label;
    out.clients.push_back(std::move(a));
  }
  out.exact = rule == FederatedRule::kFfaLora || rule == FederatedRule::kFlora ||
              rule == FederatedRule::kFedExLora;
  for (const auto& [module, parts] : by_module) {
    const LoraModule& f = *parts.front().m;
    auto label = [&](const Part& x) -> const std::string& {
      return clients[x.client].adapter->label;
    };
    Eigen::Index rmax = 0, rsum = 0;
    for (const auto& x : parts) {
      if (x.m->in_features() != f.in_features() || x.m->out_features() != f.out_features() ||
          x.m->kind != f.kind || x.m->transposed() != f.transposed()) {
        fail(fn, ": module '", module, "' is ", f.out_features(), "x", f.in_features(), " in '",
             label(parts.front()), "' but ", x.m->out_features(), "x", x.m->in_features(),
             " (or another kind/layout) in '", label(x), "'");
      }
      rmax = std::max(rmax, static_cast<Eigen::Index>(x.m->rank()));
      rsum += static_cast<Eigen::Index>(x.m->rank());
    }
    const bool common_scaling = rule != FederatedRule::kFlora && rule != FederatedRule::kFlexLora;
    if (common_scaling) {
      for (const auto& x : parts) {
        if (x.m->scaling != f.scaling) {
          fail(fn, ": module '", module, "' has scaling ", f.scaling, " in '", label(parts.front()),
               "' but ", x.m->scaling, " in '", label(x),
               "'; this rule averages factors and needs one scaling (use flora or flexlora)");
        }
      }
    }
    const auto in = static_cast<Eigen::Index>(f.in_features());
    const auto outf = static_cast<Eigen::Index>(f.out_features());
    switch (rule) {
      case FederatedRule::kFedIt:
      case FederatedRule::kFedExLora:
      case FederatedRule::kFedSaLora:
      case FederatedRule::kLoraFairLs:
      case FederatedRule::kHetLora: {
        std::vector<double> q(parts.size());
        if (rule != FederatedRule::kHetLora) {
          for (std::size_t i = 0; i < parts.size(); ++i) q[i] = p[parts[i].client];
        } else {
          double norm_sum = 0;
          for (std::size_t i = 0; i < parts.size(); ++i)
            norm_sum += q[i] = product_norm(*parts[i].m);
          for (auto& e : q)
            e = norm_sum > 0 ? e / norm_sum : 1.0 / static_cast<double>(parts.size());
        }
        MatD a = MatD::Zero(rmax, in), b = MatD::Zero(outf, rmax);
        for (std::size_t i = 0; i < parts.size(); ++i) {
          a += q[i] * padded_a(*parts[i].m, rmax);
          b += q[i] * padded_b(*parts[i].m, rmax);
        }
        out.global.modules.push_back(with_factors(f, a, b, f.scaling));
        if (rule == FederatedRule::kFedExLora) {
          // Residual Σ p_k·s·B_k·A_k − s·B̄·Ā as one low-rank pair: [B_k … | B̄]·[p_k·s·A_k …; −s·Ā].
          MatD ra(rsum + rmax, in), rb(outf, rsum + rmax);
          stack_factors(parts, p, ra, rb);
          ra.bottomRows(rmax) = -f.scaling * a;
          rb.rightCols(rmax) = b;
          if (out.residual.modules.empty()) {
            out.residual.config = out.global.config;
            out.residual.label = "fedex-lora residual";
          }
          out.residual.modules.push_back(with_factors(f, ra, rb, 1.0));
        }
        if (rule == FederatedRule::kLoraFairLs) {
          // ΔB = (M − s·B̄Ā)·Āᵀ·(ĀĀᵀ)⁺ / s with M·Āᵀ = Σ p_k·s·B_k·(A_k·Āᵀ): no dense M.
          MatD mat = MatD::Zero(outf, rmax);
          for (const auto& x : parts) {
            mat += (p[x.client] * x.m->scaling) *
                   (detail::to_mat(x.m->b) * (detail::to_mat(x.m->a) * a.transpose()));
          }
          const MatD gram = a * a.transpose();
          mat -= f.scaling * (b * gram);
          const Eigen::CompleteOrthogonalDecomposition<MatD> cod(gram);
          // (ĀĀᵀ)⁺ is symmetric: ΔB = mat·G⁺ = (G⁺·matᵀ)ᵀ.
          b += cod.solve(mat.transpose()).transpose() / f.scaling;
        }
        for (const auto& x : parts) {
          const auto r = static_cast<Eigen::Index>(x.m->rank());
          const MatD own_b =
              rule == FederatedRule::kFedSaLora ? detail::to_mat(x.m->b) : MatD(b.leftCols(r));
          out.clients[x.client].modules.push_back(
              with_factors(f, a.topRows(r), own_b, x.m->scaling));
        }
        if (rule == FederatedRule::kLoraFairLs)
          out.global.modules.back() = with_factors(f, a, b, f.scaling);
        break;
      }
      case FederatedRule::kFfaLora: {
        const LoraModule& first = f;
        for (const auto& x : parts) {
          if (x.m->rank() != first.rank() ||
              std::memcmp(x.m->a.view().bytes(), first.a.view().bytes(), first.a.nbytes()) != 0) {
            fail(fn, ": module '", module, "': lora_A of '", label(x), "' differs from that of '",
                 label(parts.front()), "'; FFA-LoRA needs the same frozen A on every client");
          }
        }
        MatD b = MatD::Zero(outf, rmax);
        for (const auto& x : parts) b += p[x.client] * detail::to_mat(x.m->b);
        const MatD a = detail::to_mat(first.a);
        out.global.modules.push_back(with_factors(f, a, b, f.scaling));
        for (const auto& x : parts)
          out.clients[x.client].modules.push_back(with_factors(f, a, b, f.scaling));
        break;
      }
      case FederatedRule::kFlora: {
        MatD a(rsum, in), b(outf, rsum);
        stack_factors(parts, p, a, b);
        out.global.modules.push_back(with_factors(f, a, b, 1.0));
        for (const auto& x : parts)
          out.clients[x.client].modules.push_back(with_factors(f, a, b, 1.0));
        break;
      }
      case FederatedRule::kFlexLora: {
        std::vector<const Tensor*> bs, as;
        std::vector<double> coef;
        for (const auto& x : parts) {
          bs.push_back(&x.m->b);
          as.push_back(&x.m->a);
          coef.push_back(p[x.client] * x.m->scaling);
        }
        const LowRankSvd s = factored_svd(bs, as, coef, static_cast<std::uint64_t>(rmax));
        const MatD us = detail::to_mat(s.us), vt = detail::to_mat(s.vt);
        out.global.modules.push_back(with_factors(f, vt, us, 1.0));
        for (const auto& x : parts) {
          const Eigen::Index r =
              std::min<Eigen::Index>(static_cast<Eigen::Index>(x.m->rank()), us.cols());
          out.clients[x.client].modules.push_back(
              with_factors(f, vt.topRows(r), us.leftCols(r) / x.m->scaling, x.m->scaling));
        }
        break;
      }
    }
  }
  return out;
}

Tensor fed_sb_average(const std::vector<const Tensor*>& r, const std::vector<double>& weights) {
  const char* fn = "fed_sb_average";
  if (r.empty()) fail(fn, ": no R matrices");
  if (weights.size() != r.size())
    fail(fn, ": ", weights.size(), " weights for ", r.size(), " matrices");
  double total = 0;
  for (std::size_t k = 0; k < r.size(); ++k) {
    if (r[k] == nullptr) fail(fn, ": matrix ", k, " is null");
    const Shape& sh = r[k]->shape();
    if (r[k]->dtype() != DType::kF32 || sh.rank() != 2 || sh[0] != sh[1] || sh != r[0]->shape()) {
      fail(fn, ": matrix ", k, " is ", dtype_name(r[k]->dtype()), " ", sh.to_string(),
           "; every R must be the same square F32 r x r");
    }
    if (!std::isfinite(weights[k]) || weights[k] < 0) {
      fail(fn, ": weight ", k, " = ", weights[k], " must be finite and >= 0");
    }
    total += weights[k];
    const float* v = r[k]->view().data_as<float>();
    for (std::size_t i = 0; i < r[k]->numel(); ++i) {
      if (!std::isfinite(v[i]))
        fail(fn, ": matrix ", k, " holds a non-finite value at element ", i);
    }
  }
  if (!(total > 0)) fail(fn, ": the weights are all zero");
  MatD mean = MatD::Zero(static_cast<Eigen::Index>(r[0]->shape()[0]),
                         static_cast<Eigen::Index>(r[0]->shape()[1]));
  for (std::size_t k = 0; k < r.size(); ++k) mean += (weights[k] / total) * detail::to_mat(*r[k]);
  return detail::to_tensor(mean);
}

LoraAdapter lift_adapter(const LoraAdapter& sub, const ModelLayout& target, const Plan& plan) {
  validate_plan(plan, target, "lift_adapter: plan");
  const detail::PlanLists lists(target, plan);
  const auto by_local = detail::tensors_by_local_name(target, lists);
  LoraAdapter out;
  out.config = sub.config;
  out.label = sub.label + " (lifted)";
  detail::reject_dora("lift_adapter", sub);
  for (const auto& m : sub.modules) {
    auto it = by_local.find(m.weight_name());
    if (it == by_local.end()) {
      fail("lift_adapter: adapter '", sub.label, "': module '", m.module, "' targets '",
           m.weight_name(), "', which the plan's sub-model does not have");
    }
    const ModelLayout::Tensor* t = &target.tensors()[it->second];
    const detail::Slice s = detail::slice_of(target, *t, lists, true);
    if (s.local_shape != m.weight_shape()) {
      fail("lift_adapter: adapter '", sub.label, "': module '", m.module, "' (A ",
           m.a.shape().to_string(), ", B ", m.b.shape().to_string(), ") needs ",
           m.weight_shape().to_string(), " but the sub-model's '", m.weight_name(), "' is ",
           s.local_shape.to_string());
    }
    const std::string& tname = t->meta.name;
    const std::string suffix = ".weight";
    if (tname.size() <= suffix.size() ||
        tname.compare(tname.size() - suffix.size(), suffix.size(), suffix) != 0) {
      fail("lift_adapter: target tensor '", tname, "' does not end in .weight");
    }
    // Dimension of the weight holding B's rows (out) and A's columns (in).
    const int out_dim = m.transposed() ? 1 : 0, in_dim = m.transposed() ? 0 : 1;
    const auto r = m.rank();
    const std::uint64_t tout = t->meta.shape[out_dim], tin = t->meta.shape[in_dim];
    Tensor a = Tensor::zeros(DType::kF32, Shape{r, tin});
    Tensor b = Tensor::zeros(DType::kF32, Shape{tout, r});
    const float* sa = m.a.view().data_as<float>();
    const float* sb = m.b.view().data_as<float>();
    float* da = a.view().data_as<float>();
    float* db = b.view().data_as<float>();
    const auto& rows = s.elems[static_cast<std::size_t>(out_dim)];
    const auto& cols = s.elems[static_cast<std::size_t>(in_dim)];
    const auto& keep_rows = s.keep[static_cast<std::size_t>(out_dim)];
    const auto& keep_cols = s.keep[static_cast<std::size_t>(in_dim)];
    const auto in_local = m.in_features();
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (!keep_rows[i]) continue;
      std::memcpy(db + std::uint64_t{rows[i]} * r, sb + i * r, r * sizeof(float));
    }
    for (std::uint64_t k = 0; k < r; ++k) {
      for (std::size_t j = 0; j < cols.size(); ++j) {
        if (keep_cols[j]) da[k * tin + cols[j]] = sa[k * in_local + j];
      }
    }
    LoraModule lm;
    lm.module = tname.substr(0, tname.size() - suffix.size());
    lm.kind = m.kind;
    lm.fan_in_fan_out = m.fan_in_fan_out;
    lm.a = std::move(a);
    lm.b = std::move(b);
    lm.scaling = m.scaling;
    out.modules.push_back(std::move(lm));
  }
  std::sort(out.modules.begin(), out.modules.end(),
            [](const LoraModule& x, const LoraModule& y) { return x.module < y.module; });
  return out;
}

}  // namespace edgefuse
