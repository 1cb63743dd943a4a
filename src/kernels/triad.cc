// Dispatch unit for the STREAM triad (kernels/triad.h) and the SIMD target name
// (kernels/target.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/triad.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void TriadF32(float* HWY_RESTRICT a, const float* HWY_RESTRICT b, const float* HWY_RESTRICT c,
              float s, std::size_t n) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vs = hn::Set(df, s);
  std::size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    hn::StoreU(hn::Add(hn::LoadU(df, b + i), hn::Mul(vs, hn::LoadU(df, c + i))), df, a + i);
    hn::StoreU(hn::Add(hn::LoadU(df, b + i + N), hn::Mul(vs, hn::LoadU(df, c + i + N))), df,
               a + i + N);
  }
  for (; i < n; ++i) a[i] = b[i] + s * c[i];
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <chrono>
#include <new>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/core/tensor.h"
#include "edgefuse/kernels/target.h"
#include "edgefuse/kernels/triad.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(TriadF32);

void triad(float* a, const float* b, const float* c, float s, std::size_t n) {
  detail::check_pointer("triad", "a", a, n);
  detail::check_pointer("triad", "b", b, n);
  detail::check_pointer("triad", "c", c, n);
  detail::init_dispatch();
  auto* kernel = &HWY_DYNAMIC_DISPATCH(TriadF32);
  parallel_for(n, detail::kStreamGrain,
               [&](std::size_t lo, std::size_t hi) { kernel(a + lo, b + lo, c + lo, s, hi - lo); });
}

double measure_triad_bytes_per_second(std::size_t n, int reps) {
  if (n == 0 || reps <= 0) {
    detail::fail("measure_triad_bytes_per_second: need n > 0 and reps > 0, got n = ", n,
                 ", reps = ", reps);
  }
  Tensor ta = Tensor::empty(DType::kF32, {n});
  Tensor tb = Tensor::empty(DType::kF32, {n});
  Tensor tc = Tensor::empty(DType::kF32, {n});
  float* a = ta.view().data_as<float>();
  float* b = tb.view().data_as<float>();
  float* c = tc.view().data_as<float>();
  // First touch by the same chunks the triad uses, so pages are faulted in before timing.
  parallel_for(n, detail::kStreamGrain, [&](std::size_t lo, std::size_t hi) {
    std::fill(a + lo, a + hi, 0.0f);
    std::fill(b + lo, b + hi, 1.0f);
    std::fill(c + lo, c + hi, 2.0f);
  });
  triad(a, b, c, 3.0f, n);  // warm-up
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    triad(a, b, c, 3.0f, n);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::max(best, 12.0 * static_cast<double>(n) / dt.count());
  }
  return best;
}

const char* simd_target_name() {
  const std::int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);  // lowest bit = best target on every arch
}

double measure_triad_if_memory_allows(std::size_t n, int reps) {
  for (; n >= (std::size_t{1} << 16); n /= 2) {
    try {
      return measure_triad_bytes_per_second(n, reps);
    } catch (const Error&) {  // the arrays could not be allocated
    } catch (const std::bad_alloc&) {
    }
  }
  return 0.0;
}

}  // namespace edgefuse
#endif  // HWY_ONCE
