// Per-target bodies of acc += w * x (kernels/accumulate.h).

#if defined(EDGEFUSE_SRC_KERNELS_ACCUMULATE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_ACCUMULATE_INL_H_
#undef EDGEFUSE_SRC_KERNELS_ACCUMULATE_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_ACCUMULATE_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// acc[i] = fl(acc[i] + fl(w * x[i])). Mul and Add stay separate ops (the library is built
// with -ffp-contract=off): an FMA would round once and differ from the SSE4 and scalar paths.
template <typename T>
HWY_INLINE void AccumulateArray(float* HWY_RESTRICT acc, const T* HWY_RESTRICT x, std::size_t n,
                                float w) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vw = hn::Set(df, w);
  std::size_t i = 0;
  // Four independent vectors per iteration: enough loads in flight to stream from DRAM on
  // one core without relying on the hardware prefetcher alone.
  for (; i + 4 * N <= n; i += 4 * N) {
    const auto x0 = LoadF32(df, x + i);
    const auto x1 = LoadF32(df, x + i + N);
    const auto x2 = LoadF32(df, x + i + 2 * N);
    const auto x3 = LoadF32(df, x + i + 3 * N);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i), hn::Mul(vw, x0)), df, acc + i);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i + N), hn::Mul(vw, x1)), df, acc + i + N);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i + 2 * N), hn::Mul(vw, x2)), df, acc + i + 2 * N);
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i + 3 * N), hn::Mul(vw, x3)), df, acc + i + 3 * N);
  }
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::Add(hn::LoadU(df, acc + i), hn::Mul(vw, LoadF32(df, x + i))), df, acc + i);
  }
  for (; i < n; ++i) acc[i] += w * ScalarToF32(x[i]);
}

// acc[index[i]] += w * x[i]. x is widened and scaled with SIMD into a block on the stack;
// the scatter is scalar (AVX2 has no scatter, and random indices miss cache anyway).
template <typename T>
HWY_INLINE void AccumulateIndexedArray(float* HWY_RESTRICT acc, const T* HWY_RESTRICT x,
                                       const std::uint32_t* HWY_RESTRICT index, std::size_t n,
                                       float w) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  constexpr std::size_t kBlock = 512;  // 2 KiB of f32: stays in L1 next to the indices
  HWY_ALIGN float scaled[kBlock];
  const auto vw = hn::Set(df, w);
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t len = n - b < kBlock ? n - b : kBlock;
    std::size_t j = 0;
    for (; j + N <= len; j += N) hn::StoreU(hn::Mul(vw, LoadF32(df, x + b + j)), df, scaled + j);
    for (; j < len; ++j) scaled[j] = w * ScalarToF32(x[b + j]);
    for (j = 0; j < len; ++j) acc[index[b + j]] += scaled[j];
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
