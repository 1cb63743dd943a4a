// Private: the SIMD row primitives of the fused distillation loss (src/distill/loss.cc), one
// pass over a row each, dispatched at run time to the best Highway target. Not installed.
#pragma once

#include <cstddef>

namespace edgefuse::detail {

struct DistillRowKernels {
  // max of x[0, n); -inf for n == 0.
  float (*row_max)(const float* x, std::size_t n);
  // out = exp((x - m) * sx); sums[0] = Σ out, sums[1] = Σ out * (x*sx - y*sy) (y may be null).
  void (*exp_sum)(const float* x, float sx, const float* y, float sy, float m, std::size_t n,
                  float* out, double* sums);
  // grad = a*e1 - b*e2 (grad may alias e1).
  void (*combine)(const float* e1, float a, const float* e2, float b, std::size_t n, float* grad);
  // out = log(p), -inf where p == 0.
  void (*log)(const float* p, std::size_t n, float* out);
  // grad = c * e * ((x*sx - y*sy) - k), 0 where e == 0.
  void (*scaled_diff_grad)(const float* e, const float* x, float sx, const float* y, float sy,
                           std::size_t n, float c, float k, float* grad);
  // grad = c * e * (g - k), 0 where e == 0.
  void (*scaled_grad)(const float* e, const float* g, std::size_t n, float c, float k, float* grad);
  // Generalized JSD pass; params = {1/Zs, 1/Zt, lse_s, lse_t, beta, 1-beta, a, b}; sums =
  // {KL(p||M), KL(q||M), Σ q g}; et is overwritten with g (see distill_rows-inl.h).
  void (*jsd_pass)(const float* es, float* et, const float* x, float sx, const float* y, float sy,
                   std::size_t n, const float* params, double* sums);
};

// The kernels of the best target this CPU supports (or the one forced by
// hwy::SetSupportedTargetsForTest), fetched once per call of the loss.
DistillRowKernels distill_row_kernels();

}  // namespace edgefuse::detail
