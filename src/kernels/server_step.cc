// Dispatch unit and argument checks for kernels/server_step.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/server_step.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/server_step-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

// One wrapper per dtype: Highway 1.0.3 has no HWY_EXPORT_T.
std::size_t ServerStepF32(bool delta, ServerRule rule, float* out, const float* base,
                          const float* acc, const float* wsum, float* m, float* v, std::size_t n,
                          const detail::StepConstants& k) {
  return StepAny(delta, rule, out, base, acc, wsum, m, v, n, k);
}
std::size_t ServerStepBF16(bool delta, ServerRule rule, BFloat16* out, const BFloat16* base,
                           const float* acc, const float* wsum, float* m, float* v, std::size_t n,
                           const detail::StepConstants& k) {
  return StepAny(delta, rule, out, base, acc, wsum, m, v, n, k);
}
std::size_t ServerStepF16(bool delta, ServerRule rule, Float16* out, const Float16* base,
                          const float* acc, const float* wsum, float* m, float* v, std::size_t n,
                          const detail::StepConstants& k) {
  return StepAny(delta, rule, out, base, acc, wsum, m, v, n, k);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "src/kernels/dispatch.h"
#include "src/kernels/tile.h"

namespace edgefuse {

HWY_EXPORT(ServerStepF32);
HWY_EXPORT(ServerStepBF16);
HWY_EXPORT(ServerStepF16);

namespace {

constexpr const char* kFn = "server_step";

template <typename T>
using StepKernel = std::size_t (*)(bool, ServerRule, T*, const T*, const float*, const float*,
                                   float*, float*, std::size_t, const detail::StepConstants&);
StepKernel<float> kernel_of(const float*) { return HWY_DYNAMIC_DISPATCH(ServerStepF32); }
StepKernel<BFloat16> kernel_of(const BFloat16*) { return HWY_DYNAMIC_DISPATCH(ServerStepBF16); }
StepKernel<Float16> kernel_of(const Float16*) { return HWY_DYNAMIC_DISPATCH(ServerStepF16); }

void check_unit_interval(const char* name, float x) {
  if (!(x >= 0.0f && x < 1.0f)) detail::fail(kFn, ": ", name, " = ", x, " must be in [0, 1)");
}

// The parameters' ranges (kernels/server_step.h); throws Error naming the one out of range.
void check_params(const ServerStep& p) {
  if (p.rule != ServerRule::kFedAvgM && p.rule != ServerRule::kFedAdam &&
      p.rule != ServerRule::kFedYogi && p.rule != ServerRule::kFedAdagrad &&
      p.rule != ServerRule::kNesterov) {
    detail::fail(kFn, ": unknown rule ", static_cast<int>(p.rule));
  }
  if (!(p.lr > 0.0f) || !(p.lr - p.lr == 0.0f)) {
    detail::fail(kFn, ": lr = ", p.lr, " must be finite and > 0");
  }
  check_unit_interval("momentum", p.momentum);
  check_unit_interval("beta1", p.beta1);
  check_unit_interval("beta2", p.beta2);
  if (!(p.tau > 0.0f) || !(p.tau - p.tau == 0.0f)) {
    detail::fail(kFn, ": tau = ", p.tau, " must be finite and > 0");
  }
}

detail::StepConstants constants_of(const ServerStep& p) {
  return {p.lr, p.momentum, p.beta1, 1.0f - p.beta1, p.beta2, 1.0f - p.beta2, p.tau};
}

// server_step()'s contract (kernels/server_step.h); throws Error naming the broken rule.
template <typename T>
detail::StepConstants check_step_args(T* out, const T* base, const float* acc, const float* wsum,
                                      float* m, float* v, std::size_t n, const ServerStep& p) {
  check_params(p);
  const detail::StepConstants k = constants_of(p);
  const bool two = p.rule != ServerRule::kFedAvgM && p.rule != ServerRule::kNesterov;
  detail::check_pointer(kFn, "out", out, n);
  detail::check_pointer(kFn, "base", base, n);
  detail::check_pointer(kFn, "acc", acc, n);
  detail::check_pointer(kFn, "wsum", wsum, n);
  detail::check_pointer(kFn, "m", m, n);
  if (two) detail::check_pointer(kFn, "v", v, n);
  const std::size_t tb = n * sizeof(T), fb = n * sizeof(float);
  if (static_cast<const void*>(out) != static_cast<const void*>(base)) {
    detail::check_disjoint(kFn, "out", out, tb, "base", base, tb);
  }
  const std::vector<std::pair<const char*, const void*>> f32s{
      {"acc", acc}, {"wsum", wsum}, {"m", m}, {"v", two ? v : nullptr}};
  for (std::size_t a = 0; a < f32s.size(); ++a) {
    if (f32s[a].second == nullptr) continue;
    detail::check_disjoint(kFn, "out", out, tb, f32s[a].first, f32s[a].second, fb);
    for (std::size_t b = a + 1; b < f32s.size(); ++b) {
      if (f32s[b].second == nullptr) continue;
      detail::check_disjoint(kFn, f32s[a].first, f32s[a].second, fb, f32s[b].first, f32s[b].second,
                             fb);
    }
  }
  return k;
}

bool two_states(ServerRule rule) {
  return rule != ServerRule::kFedAvgM && rule != ServerRule::kNesterov;
}

template <typename T>
std::size_t step_checked(T* out, const T* base, const float* acc, const float* wsum, float* m,
                         float* v, std::size_t n, const ServerStep& p) {
  const detail::StepConstants k = check_step_args(out, base, acc, wsum, m, v, n, p);
  const bool two = two_states(p.rule);
  if (n == 0) return 0;
  detail::init_dispatch();
  const StepKernel<T> kernel = kernel_of(out);
  // Fixed chunks of the element range: the partition depends on n only.
  std::vector<std::size_t> covered((n + detail::kStreamGrain - 1) / detail::kStreamGrain, 0);
  parallel_for(n, detail::kStreamGrain, [&](std::size_t b, std::size_t e) {
    covered[b / detail::kStreamGrain] = kernel(p.delta, p.rule, out + b, base + b, acc + b,
                                               wsum + b, m + b, two ? v + b : nullptr, e - b, k);
  });
  std::size_t total = 0;
  for (const std::size_t c : covered) total += c;
  return total;
}

template <typename T>
std::size_t step_here(T* out, const T* base, const float* acc, const float* wsum, float* m,
                      float* v, std::size_t n, const ServerStep& p) {
  EDGEFUSE_DASSERT(detail::holds([&] { check_step_args(out, base, acc, wsum, m, v, n, p); }));
  if (n == 0) return 0;
  const detail::StepConstants k = constants_of(p);
  detail::init_dispatch();
  return kernel_of(out)(p.delta, p.rule, out, base, acc, wsum, m, two_states(p.rule) ? v : nullptr,
                        n, k);
}

}  // namespace

std::size_t detail::server_step_here(float* out, const float* base, const float* acc,
                                     const float* wsum, float* m, float* v, std::size_t n,
                                     const ServerStep& step) {
  return step_here(out, base, acc, wsum, m, v, n, step);
}
std::size_t detail::server_step_here(BFloat16* out, const BFloat16* base, const float* acc,
                                     const float* wsum, float* m, float* v, std::size_t n,
                                     const ServerStep& step) {
  return step_here(out, base, acc, wsum, m, v, n, step);
}
std::size_t detail::server_step_here(Float16* out, const Float16* base, const float* acc,
                                     const float* wsum, float* m, float* v, std::size_t n,
                                     const ServerStep& step) {
  return step_here(out, base, acc, wsum, m, v, n, step);
}

std::size_t server_step(float* out, const float* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step) {
  return step_checked(out, base, acc, wsum, m, v, n, step);
}
std::size_t server_step(BFloat16* out, const BFloat16* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step) {
  return step_checked(out, base, acc, wsum, m, v, n, step);
}
std::size_t server_step(Float16* out, const Float16* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step) {
  return step_checked(out, base, acc, wsum, m, v, n, step);
}

}  // namespace edgefuse
#endif  // HWY_ONCE
