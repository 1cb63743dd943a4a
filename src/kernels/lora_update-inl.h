// Per-target body of the LoRA merge kernel (kernels/lora_update.h).

#if defined(EDGEFUSE_SRC_KERNELS_LORA_UPDATE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_LORA_UPDATE_INL_H_
#undef EDGEFUSE_SRC_KERNELS_LORA_UPDATE_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_LORA_UPDATE_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// w <- (d == 0) ? w : round(w + d), for one vector of W.
template <class DF>
HWY_INLINE void ApplyDelta(DF df, float* HWY_RESTRICT w, hn::Vec<DF> d) {
  const auto x = hn::LoadU(df, w);
  hn::StoreU(hn::IfThenElse(hn::Eq(d, hn::Zero(df)), x, hn::Add(x, d)), df, w);
}
template <class DF, typename T>
HWY_INLINE void ApplyDelta(DF df, T* HWY_RESTRICT w, hn::Vec<DF> d) {
  const hn::RebindToUnsigned<DF> du;
  auto* p = reinterpret_cast<std::uint16_t*>(w);
  const auto bits = LoadBits16(df, p);
  hn::Vec<hn::RebindToUnsigned<DF>> r;
  if constexpr (std::is_same_v<T, BFloat16>) {
    r = F32ToBF16Bits(df, hn::Add(BF16BitsToF32(df, bits), d));
  } else {
    r = F32ToF16Bits(df, hn::Add(F16BitsToF32(df, bits), d));
  }
  StoreBits16(df, hn::IfThenElse(hn::RebindMask(du, hn::Eq(d, hn::Zero(df))), bits, r), p);
}

template <typename T>
HWY_INLINE T ScalarApplyDelta(T w, float d) {
  return d == 0.0f ? w : ScalarFromF32<T>(ScalarToF32(w) + d);
}

// Column strips of 4 vectors: the strip's rank×4N slice of rt (16 KiB at rank 64 with
// 16-lane vectors) stays in L1 while the rows of the block stream past it, and two rows at a
// time give 8 independent accumulator chains, enough to cover the add latency with separate
// multiply and add ports. Every output element is summed in the same order k = 0 … rank-1
// whatever path (strip, single vector, scalar tail) computes it.
template <typename T>
HWY_INLINE void LoraUpdateRows(T* HWY_RESTRICT w, std::size_t ldw, const float* HWY_RESTRICT l,
                               const float* HWY_RESTRICT rt, std::size_t rows, std::size_t cols,
                               std::size_t rank, float scale) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vs = hn::Set(df, scale);
  const auto neg0 = hn::Set(df, -0.0f);
  std::size_t j = 0;
  for (; j + 4 * N <= cols; j += 4 * N) {
    std::size_t i = 0;
    for (; i + 2 <= rows; i += 2) {
      auto a0 = neg0, a1 = neg0, a2 = neg0, a3 = neg0;
      auto c0 = neg0, c1 = neg0, c2 = neg0, c3 = neg0;
      const float* l0 = l + i * rank;
      const float* l1 = l0 + rank;
      for (std::size_t k = 0; k < rank; ++k) {
        const float* r = rt + k * cols + j;
        const auto r0 = hn::LoadU(df, r), r1 = hn::LoadU(df, r + N);
        const auto r2 = hn::LoadU(df, r + 2 * N), r3 = hn::LoadU(df, r + 3 * N);
        const auto x = hn::Set(df, l0[k]), y = hn::Set(df, l1[k]);
        a0 = hn::Add(a0, hn::Mul(x, r0));
        a1 = hn::Add(a1, hn::Mul(x, r1));
        a2 = hn::Add(a2, hn::Mul(x, r2));
        a3 = hn::Add(a3, hn::Mul(x, r3));
        c0 = hn::Add(c0, hn::Mul(y, r0));
        c1 = hn::Add(c1, hn::Mul(y, r1));
        c2 = hn::Add(c2, hn::Mul(y, r2));
        c3 = hn::Add(c3, hn::Mul(y, r3));
      }
      T* w0 = w + i * ldw + j;
      T* w1 = w0 + ldw;
      ApplyDelta(df, w0, hn::Mul(a0, vs));
      ApplyDelta(df, w0 + N, hn::Mul(a1, vs));
      ApplyDelta(df, w0 + 2 * N, hn::Mul(a2, vs));
      ApplyDelta(df, w0 + 3 * N, hn::Mul(a3, vs));
      ApplyDelta(df, w1, hn::Mul(c0, vs));
      ApplyDelta(df, w1 + N, hn::Mul(c1, vs));
      ApplyDelta(df, w1 + 2 * N, hn::Mul(c2, vs));
      ApplyDelta(df, w1 + 3 * N, hn::Mul(c3, vs));
    }
    for (; i < rows; ++i) {
      auto a0 = neg0, a1 = neg0, a2 = neg0, a3 = neg0;
      const float* l0 = l + i * rank;
      for (std::size_t k = 0; k < rank; ++k) {
        const float* r = rt + k * cols + j;
        const auto x = hn::Set(df, l0[k]);
        a0 = hn::Add(a0, hn::Mul(x, hn::LoadU(df, r)));
        a1 = hn::Add(a1, hn::Mul(x, hn::LoadU(df, r + N)));
        a2 = hn::Add(a2, hn::Mul(x, hn::LoadU(df, r + 2 * N)));
        a3 = hn::Add(a3, hn::Mul(x, hn::LoadU(df, r + 3 * N)));
      }
      T* w0 = w + i * ldw + j;
      ApplyDelta(df, w0, hn::Mul(a0, vs));
      ApplyDelta(df, w0 + N, hn::Mul(a1, vs));
      ApplyDelta(df, w0 + 2 * N, hn::Mul(a2, vs));
      ApplyDelta(df, w0 + 3 * N, hn::Mul(a3, vs));
    }
  }
  for (; j + N <= cols; j += N) {
    for (std::size_t i = 0; i < rows; ++i) {
      auto a = neg0;
      for (std::size_t k = 0; k < rank; ++k) {
        a = hn::Add(a, hn::Mul(hn::Set(df, l[i * rank + k]), hn::LoadU(df, rt + k * cols + j)));
      }
      ApplyDelta(df, w + i * ldw + j, hn::Mul(a, vs));
    }
  }
  for (; j < cols; ++j) {
    for (std::size_t i = 0; i < rows; ++i) {
      float a = -0.0f;
      for (std::size_t k = 0; k < rank; ++k) a = a + l[i * rank + k] * rt[k * cols + j];
      w[i * ldw + j] = ScalarApplyDelta(w[i * ldw + j], a * scale);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
