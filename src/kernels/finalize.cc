// Dispatch unit and argument checks for kernels/finalize.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/finalize.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/finalize-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

// One wrapper per (mode, dtype): Highway 1.0.3 has no HWY_EXPORT_T.
FinalizeTally FinalizeDeltaF32(float* out, const float* base, const float* acc, const float* wsum,
                               std::size_t n, float lr) {
  return FinalizeArray<true>(out, base, acc, wsum, n, lr);
}
FinalizeTally FinalizeDeltaBF16(BFloat16* out, const BFloat16* base, const float* acc,
                                const float* wsum, std::size_t n, float lr) {
  return FinalizeArray<true>(out, base, acc, wsum, n, lr);
}
FinalizeTally FinalizeDeltaF16(Float16* out, const Float16* base, const float* acc,
                               const float* wsum, std::size_t n, float lr) {
  return FinalizeArray<true>(out, base, acc, wsum, n, lr);
}
FinalizeTally FinalizeReplaceF32(float* out, const float* base, const float* acc, const float* wsum,
                                 std::size_t n, float lr) {
  return FinalizeArray<false>(out, base, acc, wsum, n, lr);
}
FinalizeTally FinalizeReplaceBF16(BFloat16* out, const BFloat16* base, const float* acc,
                                  const float* wsum, std::size_t n, float lr) {
  return FinalizeArray<false>(out, base, acc, wsum, n, lr);
}
FinalizeTally FinalizeReplaceF16(Float16* out, const Float16* base, const float* acc,
                                 const float* wsum, std::size_t n, float lr) {
  return FinalizeArray<false>(out, base, acc, wsum, n, lr);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/finalize.h"
#include "src/kernels/tile.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(FinalizeDeltaF32);
HWY_EXPORT(FinalizeDeltaBF16);
HWY_EXPORT(FinalizeDeltaF16);
HWY_EXPORT(FinalizeReplaceF32);
HWY_EXPORT(FinalizeReplaceBF16);
HWY_EXPORT(FinalizeReplaceF16);

namespace {

template <typename T>
using FinalizeKernel = FinalizeTally (*)(T*, const T*, const float*, const float*, std::size_t,
                                         float);

FinalizeKernel<float> kernel_of(const float*, FinalizeMode mode) {
  return mode == FinalizeMode::kDelta ? HWY_DYNAMIC_DISPATCH(FinalizeDeltaF32)
                                      : HWY_DYNAMIC_DISPATCH(FinalizeReplaceF32);
}
FinalizeKernel<BFloat16> kernel_of(const BFloat16*, FinalizeMode mode) {
  return mode == FinalizeMode::kDelta ? HWY_DYNAMIC_DISPATCH(FinalizeDeltaBF16)
                                      : HWY_DYNAMIC_DISPATCH(FinalizeReplaceBF16);
}
FinalizeKernel<Float16> kernel_of(const Float16*, FinalizeMode mode) {
  return mode == FinalizeMode::kDelta ? HWY_DYNAMIC_DISPATCH(FinalizeDeltaF16)
                                      : HWY_DYNAMIC_DISPATCH(FinalizeReplaceF16);
}

// finalize()'s contract (kernels/finalize.h); throws Error naming the broken rule.
template <typename T>
void check_finalize_args(T* out, const T* base, const float* acc, const float* wsum, std::size_t n,
                         FinalizeMode mode, float lr) {
  constexpr const char* kFn = "finalize";
  if (mode != FinalizeMode::kDelta && mode != FinalizeMode::kReplace) {
    detail::fail(kFn, ": mode ", static_cast<int>(mode), " is neither kDelta nor kReplace");
  }
  if (mode == FinalizeMode::kDelta) detail::check_finite(kFn, "lr", lr);
  detail::check_pointer(kFn, "out", out, n);
  detail::check_pointer(kFn, "base", base, n);
  detail::check_pointer(kFn, "acc", acc, n);
  detail::check_pointer(kFn, "wsum", wsum, n);
  const std::size_t out_bytes = n * sizeof(T);
  if (static_cast<const void*>(out) != static_cast<const void*>(base)) {
    detail::check_disjoint(kFn, "out", out, out_bytes, "base", base, out_bytes);
  }
  detail::check_disjoint(kFn, "out", out, out_bytes, "acc", acc, n * sizeof(float));
  detail::check_disjoint(kFn, "out", out, out_bytes, "wsum", wsum, n * sizeof(float));
}

template <typename T>
void finalize_checked(T* out, const T* base, const float* acc, const float* wsum, std::size_t n,
                      FinalizeMode mode, float lr) {
  check_finalize_args(out, base, acc, wsum, n, mode, lr);
  detail::init_dispatch();
  const FinalizeKernel<T> kernel = kernel_of(out, mode);
  parallel_for(n, detail::kStreamGrain, [&](std::size_t b, std::size_t e) {
    kernel(out + b, base + b, acc + b, wsum + b, e - b, lr);
  });
}

template <typename T>
FinalizeTally finalize_here(T* out, const T* base, const float* acc, const float* wsum,
                            std::size_t n, FinalizeMode mode, float lr) {
  EDGEFUSE_DASSERT(detail::holds([&] { check_finalize_args(out, base, acc, wsum, n, mode, lr); }));
  if (n == 0) return {0, false};
  detail::init_dispatch();
  return kernel_of(out, mode)(out, base, acc, wsum, n, lr);
}

}  // namespace

void finalize(float* out, const float* base, const float* acc, const float* wsum, std::size_t n,
              FinalizeMode mode, float lr) {
  finalize_checked(out, base, acc, wsum, n, mode, lr);
}
void finalize(BFloat16* out, const BFloat16* base, const float* acc, const float* wsum,
              std::size_t n, FinalizeMode mode, float lr) {
  finalize_checked(out, base, acc, wsum, n, mode, lr);
}
void finalize(Float16* out, const Float16* base, const float* acc, const float* wsum, std::size_t n,
              FinalizeMode mode, float lr) {
  finalize_checked(out, base, acc, wsum, n, mode, lr);
}

FinalizeTally detail::finalize_tally(float* out, const float* base, const float* acc,
                                     const float* wsum, std::size_t n, FinalizeMode mode,
                                     float lr) {
  return finalize_here(out, base, acc, wsum, n, mode, lr);
}
FinalizeTally detail::finalize_tally(BFloat16* out, const BFloat16* base, const float* acc,
                                     const float* wsum, std::size_t n, FinalizeMode mode,
                                     float lr) {
  return finalize_here(out, base, acc, wsum, n, mode, lr);
}
FinalizeTally detail::finalize_tally(Float16* out, const Float16* base, const float* acc,
                                     const float* wsum, std::size_t n, FinalizeMode mode,
                                     float lr) {
  return finalize_here(out, base, acc, wsum, n, mode, lr);
}

}  // namespace edgefuse
#endif  // HWY_ONCE
