// Combining LoRA adapters (lora/combine.h).
#include "edgefuse/lora/combine.h"

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "edgefuse/core/error.h"
#include "src/lora/lora_util.h"
#include "src/lora/operands.h"

namespace edgefuse {

using detail::fail;
using detail::MatD;

namespace {

constexpr struct {
  CombinationType type;
  const char* name;
} kTypes[] = {{CombinationType::kCat, "cat"},
              {CombinationType::kLinear, "linear"},
              {CombinationType::kSvd, "svd"},
              {CombinationType::kTies, "ties"},
              {CombinationType::kTiesSvd, "ties_svd"},
              {CombinationType::kDareLinear, "dare_linear"},
              {CombinationType::kDareTies, "dare_ties"},
              {CombinationType::kDareLinearSvd, "dare_linear_svd"},
              {CombinationType::kDareTiesSvd, "dare_ties_svd"},
              {CombinationType::kMagnitudePrune, "magnitude_prune"},
              {CombinationType::kMagnitudePruneSvd, "magnitude_prune_svd"},
              {CombinationType::kMergekitTiesSvd, "mergekit_ties_svd"},
              {CombinationType::kMergekitDareLinearSvd, "mergekit_dare_linear_svd"},
              {CombinationType::kMergekitDareTiesSvd, "mergekit_dare_ties_svd"}};

// The task-merge method a combination type applies (to factors or to dense deltas).
TaskMergeMethod method_of(CombinationType t) {
  switch (t) {
    case CombinationType::kLinear:
    case CombinationType::kSvd:
    case CombinationType::kCat:
      return TaskMergeMethod::kTaskArithmetic;
    case CombinationType::kTies:
    case CombinationType::kTiesSvd:
      return TaskMergeMethod::kTies;
    case CombinationType::kDareLinear:
    case CombinationType::kDareLinearSvd:
      return TaskMergeMethod::kDareLinear;
    case CombinationType::kDareTies:
    case CombinationType::kDareTiesSvd:
      return TaskMergeMethod::kDareTies;
    case CombinationType::kMagnitudePrune:
    case CombinationType::kMagnitudePruneSvd:
      return TaskMergeMethod::kMagnitudePrune;
    case CombinationType::kMergekitTiesSvd:
      return TaskMergeMethod::kMergekitTies;
    case CombinationType::kMergekitDareLinearSvd:
      return TaskMergeMethod::kMergekitDareLinear;
    case CombinationType::kMergekitDareTiesSvd:
      return TaskMergeMethod::kMergekitDareTies;
  }
  fail("combine_adapters: unknown combination type ", static_cast<int>(t));
}

struct Member {
  const LoraModule* m;
  double w;
  const std::string* label;
};

// PEFT's clamp: hi = quantile(concat(U·S, Vᴴ), q) with linear interpolation; both to [-hi, hi].
void clamp_factors(MatD& us, MatD& vt, double q) {
  std::vector<double> all(us.data(), us.data() + us.size());
  all.insert(all.end(), vt.data(), vt.data() + vt.size());
  if (all.empty()) return;
  std::sort(all.begin(), all.end());
  const double pos = q * static_cast<double>(all.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi_i = std::min(lo + 1, all.size() - 1);
  const double hi = all[lo] + (pos - static_cast<double>(lo)) * (all[hi_i] - all[lo]);
  us = us.cwiseMax(-hi).cwiseMin(hi);
  vt = vt.cwiseMax(-hi).cwiseMin(hi);
}

LoraModule module_from(const LoraModule& like, Tensor a, Tensor b) {
  LoraModule out;
  out.module = like.module;
  out.kind = like.kind;
  out.fan_in_fan_out = like.fan_in_fan_out;
  out.a = std::move(a);
  out.b = std::move(b);
  out.scaling = 1.0;
  return out;
}

TaskMergeOptions task_options(const CombineOptions& o, std::string stream_key) {
  TaskMergeOptions to;
  to.density = o.density;
  to.majority_sign = o.majority_sign;
  to.seed = o.seed;
  to.stream_key = std::move(stream_key);
  return to;
}

LoraModule combine_module(const std::vector<Member>& ms, const CombineOptions& o,
                          std::uint64_t default_rank) {
  const LoraModule& first = *ms.front().m;
  const auto out = first.out_features(), in = first.in_features();
  const CombinationType t = o.type;
  if (t == CombinationType::kCat) {
    std::uint64_t R = 0;
    for (const auto& x : ms) R += x.m->rank();
    Tensor a = Tensor::zeros(DType::kF32, Shape{R, in});
    Tensor b = Tensor::zeros(DType::kF32, Shape{out, R});
    float* pa = a.view().data_as<float>();
    float* pb = b.view().data_as<float>();
    std::uint64_t at = 0;
    for (const auto& x : ms) {
      const double c = x.w * x.m->scaling;
      const float* sa = x.m->a.view().data_as<float>();
      const float* sb = x.m->b.view().data_as<float>();
      const auto r = x.m->rank();
      for (std::uint64_t i = 0; i < r * in; ++i) pa[at * in + i] = static_cast<float>(c * sa[i]);
      for (std::uint64_t i = 0; i < out; ++i) {
        for (std::uint64_t k = 0; k < r; ++k) pb[i * R + at + k] = sb[i * r + k];
      }
      at += r;
    }
    return module_from(first, std::move(a), std::move(b));
  }
  if (!is_svd_type(t)) {
    // Factor-wise: PEFT weights A by sgn(w·s)·√|w·s| and B by √|w·s|.
    const auto r = first.rank();
    std::vector<const float*> as, bs;
    std::vector<double> wa, wb;
    for (const auto& x : ms) {
      if (x.m->rank() != r) {
        fail("combine_adapters: '", combination_type_name(t), "' needs equal ranks, but module '",
             first.module, "' has rank ", r, " in '", *ms.front().label, "' and ", x.m->rank(),
             " in '", *x.label, "' (use cat or an svd type)");
      }
      const double ws = x.w * x.m->scaling;
      const double root = std::sqrt(std::fabs(ws));
      as.push_back(x.m->a.view().data_as<float>());
      bs.push_back(x.m->b.view().data_as<float>());
      wa.push_back(ws < 0 ? -root : root);
      wb.push_back(root);
    }
    TaskMergeOptions to = task_options(o, first.module + ".lora_A");
    const auto ra = merge_tasks(method_of(t), as, r * in, wa, to);
    to.stream_key = first.module + ".lora_B";
    const auto rb = merge_tasks(method_of(t), bs, out * r, wb, to);
    Tensor a = Tensor::empty(DType::kF32, Shape{r, in});
    Tensor b = Tensor::empty(DType::kF32, Shape{out, r});
    std::copy(ra.begin(), ra.end(), a.view().data_as<float>());
    std::copy(rb.begin(), rb.end(), b.view().data_as<float>());
    return module_from(first, std::move(a), std::move(b));
  }
  // SVD family. D_k = s_k·B_k·A_k, merged with c_k = w_k·s_k (PEFT) or w_k.
  const std::uint64_t new_rank = o.svd_rank.value_or(default_rank);
  std::vector<double> c;
  for (const auto& x : ms) c.push_back(o.peft_svd_scaling ? x.w * x.m->scaling : x.w);
  MatD us, vt;
  if (t == CombinationType::kSvd) {
    std::vector<const Tensor*> bs, as;
    std::vector<double> coef;
    for (std::size_t k = 0; k < ms.size(); ++k) {
      bs.push_back(&ms[k].m->b);
      as.push_back(&ms[k].m->a);
      coef.push_back(c[k] * ms[k].m->scaling);
    }
    const LowRankSvd s = factored_svd(bs, as, coef, new_rank);
    us = detail::to_mat(s.us);
    vt = detail::to_mat(s.vt);
  } else {
    std::vector<std::vector<float>> dense(ms.size());
    std::vector<const float*> ptrs;
    for (std::size_t k = 0; k < ms.size(); ++k) {
      const MatD d = ms[k].m->scaling * (detail::to_mat(ms[k].m->b) * detail::to_mat(ms[k].m->a));
      dense[k].assign(d.data(), d.data() + d.size());  // rounded to f32, as PEFT's deltas are
      ptrs.push_back(dense[k].data());
    }
    const auto merged =
        merge_tasks(method_of(t), ptrs, out * in, c, task_options(o, first.module + ".delta"));
    MatD d(static_cast<Eigen::Index>(out), static_cast<Eigen::Index>(in));
    for (Eigen::Index i = 0; i < d.size(); ++i) d.data()[i] = merged[static_cast<std::size_t>(i)];
    Eigen::BDCSVD<Eigen::MatrixXd> svd(d, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const auto k = static_cast<Eigen::Index>(
        std::min<std::uint64_t>(new_rank, static_cast<std::uint64_t>(svd.singularValues().size())));
    us = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal();
    vt = svd.matrixV().leftCols(k).transpose();
  }
  if (o.svd_clamp) clamp_factors(us, vt, *o.svd_clamp);
  return module_from(first, detail::to_tensor(vt), detail::to_tensor(us));
}

}  // namespace

CombinationType parse_combination_type(std::string_view name) {
  std::string valid;
  for (const auto& n : kTypes) {
    if (name == n.name) return n.type;
    valid += valid.empty() ? "" : ", ";
    valid += n.name;
  }
  fail("unknown combination type '", name, "' (valid: ", valid, ")");
}

const char* combination_type_name(CombinationType t) {
  for (const auto& n : kTypes) {
    if (n.type == t) return n.name;
  }
  return "?";
}

bool is_svd_type(CombinationType t) {
  switch (t) {
    case CombinationType::kSvd:
    case CombinationType::kTiesSvd:
    case CombinationType::kDareLinearSvd:
    case CombinationType::kDareTiesSvd:
    case CombinationType::kMagnitudePruneSvd:
    case CombinationType::kMergekitTiesSvd:
    case CombinationType::kMergekitDareLinearSvd:
    case CombinationType::kMergekitDareTiesSvd:
      return true;
    default:
      return false;
  }
}

LoraAdapter combine_adapters(const std::vector<const LoraAdapter*>& adapters,
                             const std::vector<double>& weights, const CombineOptions& o) {
  const char* type = combination_type_name(o.type);
  if (std::string(type) == "?")
    fail("combine_adapters: unknown combination type ", static_cast<int>(o.type));
  if (adapters.empty()) fail("combine_adapters: no adapters given");
  for (const LoraAdapter* a : adapters) detail::reject_dora("combine_adapters", *a);
  if (weights.size() != adapters.size()) {
    fail("combine_adapters: ", weights.size(), " weights for ", adapters.size(), " adapters");
  }
  for (std::size_t k = 0; k < weights.size(); ++k) {
    if (!std::isfinite(weights[k])) {
      fail("combine_adapters: the weight of adapter '", adapters[k]->label, "' is ", weights[k],
           ", not finite");
    }
  }
  if (!(o.density > 0.0 && o.density <= 1.0)) {
    fail("combine_adapters: density = ", o.density, " is outside (0, 1]");
  }
  if (o.svd_rank && *o.svd_rank == 0) fail("combine_adapters: svd_rank must be at least 1");
  if (o.svd_clamp && !(*o.svd_clamp > 0.0 && *o.svd_clamp <= 1.0)) {
    fail("combine_adapters: svd_clamp = ", *o.svd_clamp, " is outside (0, 1]");
  }
  std::map<std::string, std::vector<Member>> by_module;
  std::uint64_t max_rank = 0;
  for (std::size_t k = 0; k < adapters.size(); ++k) {
    for (const auto& m : adapters[k]->modules) {
      by_module[m.module].push_back({&m, weights[k], &adapters[k]->label});
      max_rank = std::max(max_rank, m.rank());
    }
  }
  LoraAdapter out;
  out.config = adapters.front()->config;
  out.label = std::string("combined (") + type + ")";
  for (const auto& [module, ms] : by_module) {
    const LoraModule& f = *ms.front().m;
    for (const auto& x : ms) {
      if (x.m->in_features() != f.in_features() || x.m->out_features() != f.out_features() ||
          x.m->kind != f.kind || x.m->transposed() != f.transposed()) {
        fail("combine_adapters: module '", module, "' is ", f.out_features(), "x", f.in_features(),
             " in '", *ms.front().label, "' but ", x.m->out_features(), "x", x.m->in_features(),
             " (or another kind/layout) in '", *x.label, "'");
      }
    }
    out.modules.push_back(combine_module(ms, o, max_rank));
  }
  return out;
}

}  // namespace edgefuse
