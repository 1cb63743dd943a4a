// Per-target bodies of the coverage-weighted finalize (kernels/finalize.h).

#if defined(EDGEFUSE_SRC_KERNELS_FINALIZE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_FINALIZE_INL_H_
#undef EDGEFUSE_SRC_KERNELS_FINALIZE_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_FINALIZE_INL_H_
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"
#include "src/kernels/tile.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// A zero increment keeps base's own bits: -0 + 0 would give +0, and a client that sent a
// zero delta must leave the target bit for bit as it was.
template <bool kDelta, class DF, class V = hn::Vec<DF>>
HWY_INLINE V FinalizeValue(DF df, V base, V acc, V wsum, V vlr) {
  const V q = hn::Div(acc, wsum);  // IEEE division on every target: no reciprocal estimate
  if constexpr (kDelta) {
    const V inc = hn::Mul(vlr, q);
    return hn::IfThenElse(hn::Eq(inc, hn::Zero(df)), base, hn::Add(base, inc));
  } else {
    (void)df;
    (void)base;
    (void)vlr;
    return q;
  }
}

template <bool kDelta>
HWY_INLINE float FinalizeScalar(float base, float acc, float wsum, float lr) {
  const float q = acc / wsum;
  if (!kDelta) return q;
  const float inc = lr * q;
  return inc == 0.0f ? base : base + inc;
}

// The smallest magnitude that no longer fits the output type: f32 values at or above it round
// to +-Inf there (bf16: halfway between its largest finite 0x7F7F and 0x7F80, which rounding
// to nearest even sends up; f16: 65520, halfway above 65504); +Inf for f32 itself.
template <typename T>
constexpr float kUnrepresentableFrom = std::is_same_v<T, BFloat16> ? 3.3961775e38f
                                       : std::is_same_v<T, Float16>
                                           ? 65520.0f
                                           : std::numeric_limits<float>::infinity();

// Adds NaN to `chk` for a covered lane (wsum > 0) whose f32 result r is NaN or does not fit the
// output type (|r| >= limit); chk stays NaN once it is. A client value or sum that is NaN or
// +-Inf leaves r so, and so does a finite sum whose mean or update leaves the output's range:
// the aggregator's fused check (AggregateOptions::finite_check) and overflow detection.
template <class DF, class V = hn::Vec<DF>>
HWY_INLINE V FlagUnrepresentable(DF df, V chk, V r, V wsum, V limit) {
  const auto bad = hn::AndNot(hn::Lt(hn::Abs(r), limit), hn::Gt(wsum, hn::Zero(df)));
  return hn::Add(chk,
                 hn::IfThenElseZero(bad, hn::Set(df, std::numeric_limits<float>::quiet_NaN())));
}

// Uncovered lanes (wsum <= 0 or NaN) take base's own bits, so an old value survives exactly.
// Returns the covered lanes (wsum > 0) and whether the result of one of them is NaN or +-Inf.
template <bool kDelta>
HWY_INLINE FinalizeTally FinalizeArray(float* HWY_RESTRICT out, const float* base,
                                       const float* HWY_RESTRICT acc,
                                       const float* HWY_RESTRICT wsum, std::size_t n, float lr) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vlr = hn::Set(df, lr);
  auto chk = hn::Zero(df);
  bool nonfinite = false;
  std::uint64_t covered_lanes = 0;
  std::size_t i = 0;
  for (; i + N <= n; i += N) {
    const auto b = hn::LoadU(df, base + i);
    const auto s = hn::LoadU(df, wsum + i);
    if (hn::AllFalse(df, hn::Gt(s, hn::Zero(df)))) {  // uncovered: no division
      hn::StoreU(b, df, out + i);
      continue;
    }
    const auto a = hn::LoadU(df, acc + i);
    covered_lanes += hn::CountTrue(df, hn::Gt(s, hn::Zero(df)));
    const auto r = FinalizeValue<kDelta>(df, b, a, s, vlr);
    chk = FlagUnrepresentable(df, chk, r, s, hn::Set(df, kUnrepresentableFrom<float>));
    hn::StoreU(hn::IfThenElse(hn::Gt(s, hn::Zero(df)), r, b), df, out + i);
  }
  for (; i < n; ++i) {
    const bool covered = wsum[i] > 0.0f;
    covered_lanes += covered ? 1 : 0;
    const float r = FinalizeScalar<kDelta>(base[i], acc[i], wsum[i], lr);
    nonfinite = nonfinite || (covered && !(r - r == 0.0f));
    out[i] = covered ? r : base[i];
  }
  return {covered_lanes, nonfinite || !hn::AllTrue(df, hn::Eq(chk, chk))};
}

// 16-bit outputs: base is kept as its u32-extended bit pattern, the selection happens on
// bit patterns before they are packed, and only covered lanes go through f32 and rounding.
// Flags the covered lanes whose result does not fit T in `chk` (FlagUnrepresentable).
template <bool kDelta, typename T, class DF>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<DF>> FinalizeBits16(DF df,
                                                            hn::Vec<hn::RebindToUnsigned<DF>> bits,
                                                            hn::Vec<DF> acc, hn::Vec<DF> wsum,
                                                            hn::Vec<DF> vlr, hn::Vec<DF>& chk) {
  const hn::RebindToUnsigned<DF> du;
  hn::Vec<DF> b;
  if constexpr (std::is_same_v<T, BFloat16>) {
    b = BF16BitsToF32(df, bits);
  } else {
    b = F16BitsToF32(df, bits);
  }
  const auto r = FinalizeValue<kDelta>(df, b, acc, wsum, vlr);
  chk = FlagUnrepresentable(df, chk, r, wsum, hn::Set(df, kUnrepresentableFrom<T>));
  hn::Vec<hn::RebindToUnsigned<DF>> r_bits;
  if constexpr (std::is_same_v<T, BFloat16>) {
    r_bits = F32ToBF16Bits(df, r);
  } else {
    r_bits = F32ToF16Bits(df, r);
  }
  return hn::IfThenElse(hn::RebindMask(du, hn::Gt(wsum, hn::Zero(df))), r_bits, bits);
}

template <bool kDelta, typename T>
HWY_INLINE FinalizeTally FinalizeArray(T* HWY_RESTRICT out, const T* base,
                                       const float* HWY_RESTRICT acc,
                                       const float* HWY_RESTRICT wsum, std::size_t n, float lr) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  const auto vlr = hn::Set(df, lr);
  const auto* base16 = reinterpret_cast<const std::uint16_t*>(base);
  auto* out16 = reinterpret_cast<std::uint16_t*>(out);
  auto chk = hn::Zero(df);
  bool nonfinite = false;
  std::uint64_t covered_lanes = 0;
  std::size_t i = 0;
  const auto zero = hn::Zero(df);
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto b0 = LoadBits16(df, base16 + i), b1 = LoadBits16(df, base16 + i + N);
    const auto w0 = hn::LoadU(df, wsum + i), w1 = hn::LoadU(df, wsum + i + N);
    // Sub-model rounds leave most of a 1000x larger target uncovered: copy those stretches
    // instead of paying the division (the result is base's bits either way).
    if (hn::AllFalse(df, hn::Or(hn::Gt(w0, zero), hn::Gt(w1, zero)))) {
      StoreBits16(df, b0, out16 + i);
      StoreBits16(df, b1, out16 + i + N);
      continue;
    }
    const auto a0 = hn::LoadU(df, acc + i), a1 = hn::LoadU(df, acc + i + N);
    covered_lanes += hn::CountTrue(df, hn::Gt(w0, zero)) + hn::CountTrue(df, hn::Gt(w1, zero));
    const auto r0 = FinalizeBits16<kDelta, T>(df, b0, a0, w0, vlr, chk);
    const auto r1 = FinalizeBits16<kDelta, T>(df, b1, a1, w1, vlr, chk);
    StoreBits16(df, r0, out16 + i);
    StoreBits16(df, r1, out16 + i + N);
  }
  for (; i + N <= n; i += N) {
    const auto a = hn::LoadU(df, acc + i), w = hn::LoadU(df, wsum + i);
    covered_lanes += hn::CountTrue(df, hn::Gt(w, zero));
    const auto r = FinalizeBits16<kDelta, T>(df, LoadBits16(df, base16 + i), a, w, vlr, chk);
    StoreBits16(df, r, out16 + i);
  }
  for (; i < n; ++i) {
    const bool covered = wsum[i] > 0.0f;
    covered_lanes += covered ? 1 : 0;
    const float r = FinalizeScalar<kDelta>(ScalarToF32(base[i]), acc[i], wsum[i], lr);
    nonfinite = nonfinite || (covered && !(std::fabs(r) < kUnrepresentableFrom<T>));
    out[i] = covered ? ScalarFromF32<T>(r) : base[i];
  }
  return {covered_lanes, nonfinite || !hn::AllTrue(df, hn::Eq(chk, chk))};
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
