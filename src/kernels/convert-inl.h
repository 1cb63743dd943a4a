// Per-target bodies: loading f32/bf16/f16 arrays as f32 vectors and storing f32 vectors as
// f32/bf16/f16 with round-to-nearest-even, plus the bulk conversion loops. The rounding is
// done in u32 lanes with the same formulas as core/dtype.h (Highway 1.0.3's DemoteTo
// truncates bf16, and f16 without F16C), so every target matches the scalar functions.
// Included by every kernel that reads or writes 16-bit floats.

#if defined(EDGEFUSE_SRC_KERNELS_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_CONVERT_INL_H_
#undef EDGEFUSE_SRC_KERNELS_CONVERT_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_CONVERT_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include "edgefuse/core/dtype.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------- 16-bit patterns as u32

// Lanes(df) 16-bit patterns, zero-extended to u32 lanes.
template <class DF>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<DF>> LoadBits16(DF df, const std::uint16_t* p) {
  const hn::RebindToUnsigned<DF> du32;
  const hn::Rebind<std::uint16_t, DF> du16;
  (void)df;
  return hn::PromoteTo(du32, hn::LoadU(du16, p));
}

// Stores the low 16 bits of each u32 lane (all lanes hold values <= 0xFFFF).
template <class DF>
HWY_INLINE void StoreBits16(DF df, hn::Vec<hn::RebindToUnsigned<DF>> bits, std::uint16_t* p) {
  const hn::RebindToSigned<DF> di32;
  const hn::Rebind<std::uint16_t, DF> du16;
  (void)df;
  hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di32, bits)), du16, p);
}

// ---------------------------------------------------------------- widening (exact)

template <class DF>
HWY_INLINE hn::Vec<DF> BF16BitsToF32(DF df, hn::Vec<hn::RebindToUnsigned<DF>> bits) {
  return hn::BitCast(df, hn::ShiftLeft<16>(bits));
}

template <class DF>
HWY_INLINE hn::Vec<DF> F16BitsToF32(DF df, hn::Vec<hn::RebindToUnsigned<DF>> bits) {
  const hn::RebindToUnsigned<DF> du;
  const auto sign = hn::ShiftLeft<16>(hn::And(bits, hn::Set(du, 0x8000u)));
  const auto exp = hn::And(bits, hn::Set(du, 0x7C00u));
  const auto shifted = hn::ShiftLeft<13>(hn::And(bits, hn::Set(du, 0x7FFFu)));
  const auto normal = hn::Add(shifted, hn::Set(du, 112u << 23));
  const auto inf_nan = hn::Or(shifted, hn::Set(du, 0x7F800000u));
  // Subnormal: (2^-14 + mant * 2^-24) - 2^-14, exact.
  const auto k2m14 = hn::Set(du, 113u << 23);
  const auto subnormal =
      hn::BitCast(du, hn::Sub(hn::BitCast(df, hn::Add(shifted, k2m14)), hn::BitCast(df, k2m14)));
  const auto mag = hn::IfThenElse(hn::Eq(exp, hn::Set(du, 0x7C00u)), inf_nan,
                                  hn::IfThenElse(hn::Eq(exp, hn::Zero(du)), subnormal, normal));
  return hn::BitCast(df, hn::Or(mag, sign));
}

// ---------------------------------------------------------------- narrowing (RNE)

template <class DF>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<DF>> F32ToBF16Bits(DF df, hn::Vec<DF> v) {
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  (void)df;
  const auto u = hn::BitCast(du, v);
  const auto hi = hn::ShiftRight<16>(u);
  const auto abs = hn::BitCast(di, hn::And(u, hn::Set(du, 0x7FFFFFFFu)));
  const auto is_nan = hn::RebindMask(du, hn::Gt(abs, hn::Set(di, 0x7F800000)));
  const auto bias = hn::Add(hn::Set(du, 0x7FFFu), hn::And(hi, hn::Set(du, 1u)));
  const auto rounded = hn::ShiftRight<16>(hn::Add(u, bias));
  return hn::IfThenElse(is_nan, hn::Or(hi, hn::Set(du, 0x40u)), rounded);
}

template <class DF>
HWY_INLINE hn::Vec<hn::RebindToUnsigned<DF>> F32ToF16Bits(DF df, hn::Vec<DF> v) {
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const auto u = hn::BitCast(du, v);
  const auto sign = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 0x8000u));
  const auto a = hn::And(u, hn::Set(du, 0x7FFFFFFFu));
  const auto ai = hn::BitCast(di, a);
  // |v| >= 65536, Inf or NaN.
  const auto is_big = hn::RebindMask(du, hn::Gt(ai, hn::Set(di, (143 << 23) - 1)));
  const auto is_nan = hn::RebindMask(du, hn::Gt(ai, hn::Set(di, 0x7F800000)));
  const auto mant_hi = hn::And(hn::ShiftRight<13>(a), hn::Set(du, 0x3FFu));
  const auto big =
      hn::IfThenElse(is_nan, hn::Or(mant_hi, hn::Set(du, 0x7E00u)), hn::Set(du, 0x7C00u));
  // |v| < 2^-14: adding 0.5 puts the f16 subnormal grid on the last f32 mantissa bit, so
  // the f32 addition rounds to nearest even for us.
  const auto is_small = hn::RebindMask(du, hn::Lt(ai, hn::Set(di, 113 << 23)));
  const auto k_half = hn::Set(du, 126u << 23);
  const auto small =
      hn::Sub(hn::BitCast(du, hn::Add(hn::BitCast(df, a), hn::BitCast(df, k_half))), k_half);
  // Normal: rebias by 112, round the 13 dropped bits to nearest even (may carry into Inf).
  const auto odd = hn::And(hn::ShiftRight<13>(a), hn::Set(du, 1u));
  const auto normal =
      hn::ShiftRight<13>(hn::Add(hn::Sub(a, hn::Set(du, (112u << 23) - 0xFFFu)), odd));
  const auto mag = hn::IfThenElse(is_big, big, hn::IfThenElse(is_small, small, normal));
  return hn::Or(mag, sign);
}

// ---------------------------------------------------------------- typed load / store

template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const float* HWY_RESTRICT p) {
  return hn::LoadU(df, p);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const BFloat16* HWY_RESTRICT p) {
  return BF16BitsToF32(df, LoadBits16(df, reinterpret_cast<const std::uint16_t*>(p)));
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const Float16* HWY_RESTRICT p) {
  return F16BitsToF32(df, LoadBits16(df, reinterpret_cast<const std::uint16_t*>(p)));
}

template <class DF>
HWY_INLINE void StoreF32(DF df, hn::Vec<DF> v, float* HWY_RESTRICT p) {
  hn::StoreU(v, df, p);
}
template <class DF>
HWY_INLINE void StoreF32(DF df, hn::Vec<DF> v, BFloat16* HWY_RESTRICT p) {
  StoreBits16(df, F32ToBF16Bits(df, v), reinterpret_cast<std::uint16_t*>(p));
}
template <class DF>
HWY_INLINE void StoreF32(DF df, hn::Vec<DF> v, Float16* HWY_RESTRICT p) {
  StoreBits16(df, F32ToF16Bits(df, v), reinterpret_cast<std::uint16_t*>(p));
}

// Scalar forms for loop tails: the core/dtype.h functions, bit-identical to the above.
HWY_INLINE float ScalarToF32(float x) { return x; }
HWY_INLINE float ScalarToF32(BFloat16 x) { return to_f32(x); }
HWY_INLINE float ScalarToF32(Float16 x) { return to_f32(x); }
template <typename T>
HWY_INLINE T ScalarFromF32(float x);
template <>
HWY_INLINE float ScalarFromF32<float>(float x) {
  return x;
}
template <>
HWY_INLINE BFloat16 ScalarFromF32<BFloat16>(float x) {
  return to_bf16(x);
}
template <>
HWY_INLINE Float16 ScalarFromF32<Float16>(float x) {
  return to_f16(x);
}

// ---------------------------------------------------------------- bulk conversion

template <typename From, typename To>
HWY_INLINE void ConvertArray(const From* HWY_RESTRICT src, To* HWY_RESTRICT dst, std::size_t n) {
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  // Two vectors per iteration keep two independent load/convert/store chains in flight.
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto v0 = LoadF32(df, src + i);
    const auto v1 = LoadF32(df, src + i + N);
    StoreF32(df, v0, dst + i);
    StoreF32(df, v1, dst + i + N);
  }
  for (; i + N <= n; i += N) StoreF32(df, LoadF32(df, src + i), dst + i);
  for (; i < n; ++i) dst[i] = ScalarFromF32<To>(ScalarToF32(src[i]));
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
