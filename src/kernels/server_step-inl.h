// Per-target bodies of the server optimizer step (kernels/server_step.h).

#if defined(EDGEFUSE_SRC_KERNELS_SERVER_STEP_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_SERVER_STEP_INL_H_
#undef EDGEFUSE_SRC_KERNELS_SERVER_STEP_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_SERVER_STEP_INL_H_
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "edgefuse/kernels/server_step.h"
#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"
#include "src/kernels/server_step_constants.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using detail::StepConstants;

// One lane: d from the sums, the state updated, and the step s added to w (s == 0 keeps w).
template <ServerRule kRule, bool kDelta>
HWY_INLINE float StepScalar(float w, float acc, float wsum, float& m, float& v,
                            const StepConstants& k) {
  const float q = acc / wsum;
  const float d = kDelta ? q : q - w;
  float s;
  if constexpr (kRule == ServerRule::kFedAvgM) {
    m = k.mu * m + d;
    s = k.lr * m;
  } else if constexpr (kRule == ServerRule::kNesterov) {
    const float g = -d;
    m = k.mu * m + g;
    s = -(k.lr * (g + k.mu * m));
  } else {
    m = k.b1 * m + k.c1 * d;
    const float d2 = d * d;
    if constexpr (kRule == ServerRule::kFedAdam) {
      v = k.b2 * v + k.c2 * d2;
    } else if constexpr (kRule == ServerRule::kFedYogi) {
      const float diff = v - d2;
      const float sign = diff > 0.0f ? 1.0f : diff < 0.0f ? -1.0f : 0.0f;
      v = v - (k.c2 * d2) * sign;
    } else {
      v = v + d2;
    }
    s = k.lr * (m / (std::sqrt(v) + k.tau));
  }
  return s == 0.0f ? w : w + s;
}

// The same on vectors; m and v are replaced by their new values.
template <ServerRule kRule, bool kDelta, class DF, class V = hn::Vec<DF>>
HWY_INLINE V StepVector(DF df, V w, V acc, V wsum, V& m, V& v, const StepConstants& k) {
  const V q = hn::Div(acc, wsum);
  const V d = kDelta ? q : hn::Sub(q, w);
  V s;
  if constexpr (kRule == ServerRule::kFedAvgM) {
    m = hn::Add(hn::Mul(hn::Set(df, k.mu), m), d);
    s = hn::Mul(hn::Set(df, k.lr), m);
  } else if constexpr (kRule == ServerRule::kNesterov) {
    const V g = hn::Neg(d);
    m = hn::Add(hn::Mul(hn::Set(df, k.mu), m), g);
    s = hn::Neg(hn::Mul(hn::Set(df, k.lr), hn::Add(g, hn::Mul(hn::Set(df, k.mu), m))));
  } else {
    m = hn::Add(hn::Mul(hn::Set(df, k.b1), m), hn::Mul(hn::Set(df, k.c1), d));
    const V d2 = hn::Mul(d, d);
    if constexpr (kRule == ServerRule::kFedAdam) {
      v = hn::Add(hn::Mul(hn::Set(df, k.b2), v), hn::Mul(hn::Set(df, k.c2), d2));
    } else if constexpr (kRule == ServerRule::kFedYogi) {
      const V diff = hn::Sub(v, d2);
      const V one = hn::Set(df, 1.0f);
      const V sign = hn::IfThenElse(hn::Gt(diff, hn::Zero(df)), one,
                                    hn::IfThenElseZero(hn::Lt(diff, hn::Zero(df)), hn::Neg(one)));
      v = hn::Sub(v, hn::Mul(hn::Mul(hn::Set(df, k.c2), d2), sign));
    } else {
      v = hn::Add(v, d2);
    }
    s = hn::Mul(hn::Set(df, k.lr), hn::Div(m, hn::Add(hn::Sqrt(v), hn::Set(df, k.tau))));
  }
  return hn::IfThenElse(hn::Eq(s, hn::Zero(df)), w, hn::Add(w, s));
}

// n elements of a target of type T. Uncovered lanes keep base's bits (16-bit targets are
// selected on bit patterns) and their state. Returns the covered lanes.
template <ServerRule kRule, bool kDelta, typename T>
HWY_INLINE std::size_t StepArray(T* HWY_RESTRICT out, const T* base, const float* HWY_RESTRICT acc,
                                 const float* HWY_RESTRICT wsum, float* HWY_RESTRICT m,
                                 float* HWY_RESTRICT v, std::size_t n, const StepConstants& k) {
  constexpr bool kTwoStates = kRule != ServerRule::kFedAvgM && kRule != ServerRule::kNesterov;
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const std::size_t N = hn::Lanes(df);
  const auto zero = hn::Zero(df);
  std::size_t covered = 0, i = 0;
  for (; i + N <= n; i += N) {
    const auto s = hn::LoadU(df, wsum + i);
    const auto live = hn::Gt(s, zero);
    if (hn::AllFalse(df, live)) {  // uncovered: W copied, the state untouched
      if (static_cast<const void*>(out) != static_cast<const void*>(base)) {
        if constexpr (std::is_same_v<T, float>) {
          hn::StoreU(hn::LoadU(df, base + i), df, out + i);
        } else {
          const auto* b16 = reinterpret_cast<const std::uint16_t*>(base);
          StoreBits16(df, LoadBits16(df, b16 + i), reinterpret_cast<std::uint16_t*>(out) + i);
        }
      }
      continue;
    }
    covered += hn::CountTrue(df, live);
    const auto m0 = hn::LoadU(df, m + i);
    const auto v0 = kTwoStates ? hn::LoadU(df, v + i) : zero;
    auto m1 = m0, v1 = v0;
    if constexpr (std::is_same_v<T, float>) {
      const auto w = hn::LoadU(df, base + i);
      const auto r = StepVector<kRule, kDelta>(df, w, hn::LoadU(df, acc + i), s, m1, v1, k);
      hn::StoreU(hn::IfThenElse(live, r, w), df, out + i);
    } else {
      const auto* b16 = reinterpret_cast<const std::uint16_t*>(base);
      const auto bits = LoadBits16(df, b16 + i);
      const auto w = std::is_same_v<T, BFloat16> ? BF16BitsToF32(df, bits) : F16BitsToF32(df, bits);
      const auto r = StepVector<kRule, kDelta>(df, w, hn::LoadU(df, acc + i), s, m1, v1, k);
      const auto r_bits = std::is_same_v<T, BFloat16> ? F32ToBF16Bits(df, r) : F32ToF16Bits(df, r);
      StoreBits16(df, hn::IfThenElse(hn::RebindMask(du, live), r_bits, bits),
                  reinterpret_cast<std::uint16_t*>(out) + i);
    }
    hn::StoreU(hn::IfThenElse(live, m1, m0), df, m + i);
    if constexpr (kTwoStates) hn::StoreU(hn::IfThenElse(live, v1, v0), df, v + i);
  }
  for (; i < n; ++i) {
    if (!(wsum[i] > 0.0f)) {
      out[i] = base[i];
      continue;
    }
    ++covered;
    float mi = m[i], vi = kTwoStates ? v[i] : 0.0f;
    const float r = StepScalar<kRule, kDelta>(ScalarToF32(base[i]), acc[i], wsum[i], mi, vi, k);
    out[i] = ScalarFromF32<T>(r);
    m[i] = mi;
    if constexpr (kTwoStates) v[i] = vi;
  }
  return covered;
}

template <bool kDelta, typename T>
HWY_INLINE std::size_t StepRule(ServerRule rule, T* out, const T* base, const float* acc,
                                const float* wsum, float* m, float* v, std::size_t n,
                                const StepConstants& k) {
  switch (rule) {
    case ServerRule::kFedAvgM:
      return StepArray<ServerRule::kFedAvgM, kDelta>(out, base, acc, wsum, m, v, n, k);
    case ServerRule::kFedAdam:
      return StepArray<ServerRule::kFedAdam, kDelta>(out, base, acc, wsum, m, v, n, k);
    case ServerRule::kFedYogi:
      return StepArray<ServerRule::kFedYogi, kDelta>(out, base, acc, wsum, m, v, n, k);
    case ServerRule::kFedAdagrad:
      return StepArray<ServerRule::kFedAdagrad, kDelta>(out, base, acc, wsum, m, v, n, k);
    case ServerRule::kNesterov:
      return StepArray<ServerRule::kNesterov, kDelta>(out, base, acc, wsum, m, v, n, k);
  }
  return 0;
}

template <typename T>
HWY_INLINE std::size_t StepAny(bool delta, ServerRule rule, T* out, const T* base, const float* acc,
                               const float* wsum, float* m, float* v, std::size_t n,
                               const StepConstants& k) {
  return delta ? StepRule<true>(rule, out, base, acc, wsum, m, v, n, k)
               : StepRule<false>(rule, out, base, acc, wsum, m, v, n, k);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
