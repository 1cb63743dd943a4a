// Dispatch unit for src/kernels/distill_rows.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/distill_rows.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/distill_rows-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

float DistillRowMax(const float* x, std::size_t n) { return RowMaxImpl(x, n); }
void DistillExpSum(const float* x, float sx, const float* y, float sy, float m, std::size_t n,
                   float* out, double* sums) {
  ExpSumImpl(x, sx, y, sy, m, n, out, sums);
}
void DistillCombine(const float* e1, float a, const float* e2, float b, std::size_t n,
                    float* grad) {
  CombineImpl(e1, a, e2, b, n, grad);
}
void DistillLog(const float* p, std::size_t n, float* out) { LogImpl(p, n, out); }
void DistillScaledDiffGrad(const float* e, const float* x, float sx, const float* y, float sy,
                           std::size_t n, float c, float k, float* grad) {
  ScaledDiffGradImpl(e, x, sx, y, sy, n, c, k, grad);
}
void DistillScaledGrad(const float* e, const float* g, std::size_t n, float c, float k,
                       float* grad) {
  ScaledGradImpl(e, g, n, c, k, grad);
}
void DistillJsdPass(const float* es, float* et, const float* x, float sx, const float* y, float sy,
                    std::size_t n, const float* params, double* sums) {
  JsdPassImpl(es, et, x, sx, y, sy, n, params, sums);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/kernels/dispatch.h"
#include "src/kernels/distill_rows.h"

namespace edgefuse {

HWY_EXPORT(DistillRowMax);
HWY_EXPORT(DistillExpSum);
HWY_EXPORT(DistillCombine);
HWY_EXPORT(DistillLog);
HWY_EXPORT(DistillScaledDiffGrad);
HWY_EXPORT(DistillScaledGrad);
HWY_EXPORT(DistillJsdPass);

detail::DistillRowKernels detail::distill_row_kernels() {
  init_dispatch();
  return {&HWY_DYNAMIC_DISPATCH(DistillRowMax),         &HWY_DYNAMIC_DISPATCH(DistillExpSum),
          &HWY_DYNAMIC_DISPATCH(DistillCombine),        &HWY_DYNAMIC_DISPATCH(DistillLog),
          &HWY_DYNAMIC_DISPATCH(DistillScaledDiffGrad), &HWY_DYNAMIC_DISPATCH(DistillScaledGrad),
          &HWY_DYNAMIC_DISPATCH(DistillJsdPass)};
}

}  // namespace edgefuse
#endif  // HWY_ONCE
