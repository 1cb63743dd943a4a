// Per-target row primitives of the fused distillation loss (src/kernels/distill_rows.h).
//
// Each primitive is one pass over a row of `n` floats. Sums are kept in f32 vector lanes over
// blocks of kDistillBlock elements and each block's total is added to a double, so a
// 128K-entry vocabulary loses no more than a 1K one. A row's tail is one partial vector
// (zero-padded, the padding masked out of every sum): every element goes through the same
// vector exp/log whatever n is.

#if defined(EDGEFUSE_SRC_KERNELS_DISTILL_ROWS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_DISTILL_ROWS_INL_H_
#undef EDGEFUSE_SRC_KERNELS_DISTILL_ROWS_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_DISTILL_ROWS_INL_H_
#endif

#include <cstddef>
#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

inline constexpr std::size_t kDistillBlock = 1024;

template <class DF>
HWY_INLINE double LaneSum(DF df, hn::Vec<DF> v) {
  return static_cast<double>(hn::GetLane(hn::SumOfLanes(df, v)));
}

// Calls body(i, mask) for each vector of [0, n): full vectors with an all-true mask, then one
// partial vector. body(i, mask) must treat lanes outside the mask as absent.
template <class DF, class Body>
HWY_INLINE void ForEachVector(DF df, std::size_t begin, std::size_t end, const Body& body) {
  const std::size_t N = hn::Lanes(df);
  std::size_t i = begin;
  for (; i + N <= end; i += N) body(i, hn::FirstN(df, N), true);
  if (i < end) body(i, hn::FirstN(df, end - i), false);
}

// A partial vector goes through a stack buffer: on some targets (SSE4 in Highway 1.0.3)
// MaskedLoad and BlendedStore touch the whole vector, past the end of the row.
template <class DF>
HWY_INLINE hn::Vec<DF> Load(DF df, const float* p, hn::Mask<DF> m, bool full) {
  if (full) return hn::LoadU(df, p);
  HWY_ALIGN float buf[hn::MaxLanes(df)] = {};
  const std::size_t count = hn::CountTrue(df, m);
  for (std::size_t i = 0; i < count; ++i) buf[i] = p[i];
  return hn::Load(df, buf);
}
template <class DF>
HWY_INLINE void Store(DF df, hn::Vec<DF> v, float* p, hn::Mask<DF> m, bool full) {
  if (full) {
    hn::StoreU(v, df, p);
    return;
  }
  HWY_ALIGN float buf[hn::MaxLanes(df)];
  hn::Store(v, df, buf);
  const std::size_t count = hn::CountTrue(df, m);
  for (std::size_t i = 0; i < count; ++i) p[i] = buf[i];
}

// max_i x[i]; -inf for n == 0.
HWY_INLINE float RowMaxImpl(const float* HWY_RESTRICT x, std::size_t n) {
  const hn::ScalableTag<float> df;
  const auto ninf = hn::Set(df, -std::numeric_limits<float>::infinity());
  auto m = ninf;
  ForEachVector(df, 0, n, [&](std::size_t i, auto mask, bool full) {
    m = hn::Max(m, hn::IfThenElse(mask, Load(df, x + i, mask, full), ninf));
  });
  return hn::GetLane(hn::MaxOfLanes(df, m));
}

// out[i] = exp((x[i] - m) * sx); sums[0] = Σ out[i]; if y != nullptr,
// sums[1] = Σ_{out[i] > 0} out[i] * (x[i]*sx - y[i]*sy) (terms with out[i] = 0 are 0, so a
// -inf in x never meets an infinite difference).
HWY_INLINE void ExpSumImpl(const float* HWY_RESTRICT x, float sx, const float* HWY_RESTRICT y,
                           float sy, float m, std::size_t n, float* HWY_RESTRICT out,
                           double* sums) {
  const hn::ScalableTag<float> df;
  const auto vsx = hn::Set(df, sx), vsy = hn::Set(df, sy), vm = hn::Set(df, m);
  const auto zero = hn::Zero(df);
  double z = 0.0, d = 0.0;
  for (std::size_t b = 0; b < n; b += kDistillBlock) {
    const std::size_t e = b + kDistillBlock < n ? b + kDistillBlock : n;
    auto vz = zero, vd = zero;
    ForEachVector(df, b, e, [&](std::size_t i, auto mask, bool full) {
      const auto xv = Load(df, x + i, mask, full);
      const auto ev = hn::IfThenElseZero(mask, hn::Exp(df, hn::Mul(hn::Sub(xv, vm), vsx)));
      Store(df, ev, out + i, mask, full);
      vz = hn::Add(vz, ev);
      if (y != nullptr) {
        const auto diff = hn::Sub(hn::Mul(xv, vsx), hn::Mul(Load(df, y + i, mask, full), vsy));
        vd = hn::Add(vd, hn::IfThenElseZero(hn::Gt(ev, zero), hn::Mul(ev, diff)));
      }
    });
    z += LaneSum(df, vz);
    d += LaneSum(df, vd);
  }
  sums[0] = z;
  sums[1] = d;
}

// grad[i] = a*e1[i] - b*e2[i] (grad may alias e1 and e2).
HWY_INLINE void CombineImpl(const float* e1, float a, const float* e2, float b, std::size_t n,
                            float* grad) {
  const hn::ScalableTag<float> df;
  const auto va = hn::Set(df, a), vb = hn::Set(df, b);
  ForEachVector(df, 0, n, [&](std::size_t i, auto mask, bool full) {
    const auto r = hn::Sub(hn::Mul(va, Load(df, e1 + i, mask, full)),
                           hn::Mul(vb, Load(df, e2 + i, mask, full)));
    Store(df, r, grad + i, mask, full);
  });
}

// out[i] = log(p[i]), -inf where p[i] == 0 (p >= 0 and finite).
HWY_INLINE void LogImpl(const float* HWY_RESTRICT p, std::size_t n, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const auto zero = hn::Zero(df);
  const auto ninf = hn::Set(df, -std::numeric_limits<float>::infinity());
  const auto one = hn::Set(df, 1.0f);
  ForEachVector(df, 0, n, [&](std::size_t i, auto mask, bool full) {
    const auto pv = Load(df, p + i, mask, full);
    const auto pos = hn::Gt(pv, zero);
    // Log of a lane that is 0 (or masked off) is never used: feed it 1 instead.
    const auto lv = hn::Log(df, hn::IfThenElse(pos, pv, one));
    Store(df, hn::IfThenElse(pos, lv, ninf), out + i, mask, full);
  });
}

// grad[i] = c * e[i] * ((x[i]*sx - y[i]*sy) - k), 0 where e[i] == 0 (grad may alias e).
HWY_INLINE void ScaledDiffGradImpl(const float* e, const float* HWY_RESTRICT x, float sx,
                                   const float* HWY_RESTRICT y, float sy, std::size_t n, float c,
                                   float k, float* grad) {
  const hn::ScalableTag<float> df;
  const auto vsx = hn::Set(df, sx), vsy = hn::Set(df, sy), vc = hn::Set(df, c), vk = hn::Set(df, k),
             zero = hn::Zero(df);
  ForEachVector(df, 0, n, [&](std::size_t i, auto mask, bool full) {
    const auto ev = Load(df, e + i, mask, full);
    const auto diff = hn::Sub(hn::Sub(hn::Mul(Load(df, x + i, mask, full), vsx),
                                      hn::Mul(Load(df, y + i, mask, full), vsy)),
                              vk);
    const auto r = hn::IfThenElseZero(hn::Gt(ev, zero), hn::Mul(hn::Mul(vc, ev), diff));
    Store(df, r, grad + i, mask, full);
  });
}

// grad[i] = c * e[i] * (g[i] - k), 0 where e[i] == 0 (grad may alias e or g).
HWY_INLINE void ScaledGradImpl(const float* e, const float* g, std::size_t n, float c, float k,
                               float* grad) {
  const hn::ScalableTag<float> df;
  const auto vc = hn::Set(df, c), vk = hn::Set(df, k), zero = hn::Zero(df);
  ForEachVector(df, 0, n, [&](std::size_t i, auto mask, bool full) {
    const auto ev = Load(df, e + i, mask, full);
    const auto gv = Load(df, g + i, mask, full);
    const auto r = hn::IfThenElseZero(hn::Gt(ev, zero), hn::Mul(hn::Mul(vc, ev), hn::Sub(gv, vk)));
    Store(df, r, grad + i, mask, full);
  });
}

// The generalized-JSD pass. With q = es*inv_zs, p = et*inv_zt, log q = x*sx - lse_s,
// log p = y*sy - lse_t and M = beta*p + (1-beta)*q:
//   sums[0] = KL(p || M), sums[1] = KL(q || M), sums[2] = Σ q*g, and
//   et[i] <- g[i] = b*(log q - log M) - (1-beta)*(a*p + b*q)/M   (0 where M == 0),
// the derivative of a*KL(p||M) + b*KL(q||M) with respect to q[i], less the constant b.
HWY_INLINE void JsdPassImpl(const float* HWY_RESTRICT es, float* HWY_RESTRICT et,
                            const float* HWY_RESTRICT x, float sx, const float* HWY_RESTRICT y,
                            float sy, std::size_t n, const float* params, double* sums) {
  const hn::ScalableTag<float> df;
  const auto inv_zs = hn::Set(df, params[0]), inv_zt = hn::Set(df, params[1]);
  const auto lse_s = hn::Set(df, params[2]), lse_t = hn::Set(df, params[3]);
  const auto beta = hn::Set(df, params[4]), omb = hn::Set(df, params[5]);
  const auto va = hn::Set(df, params[6]), vb = hn::Set(df, params[7]);
  const auto vsx = hn::Set(df, sx), vsy = hn::Set(df, sy);
  const auto zero = hn::Zero(df), one = hn::Set(df, 1.0f);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (std::size_t b = 0; b < n; b += kDistillBlock) {
    const std::size_t e = b + kDistillBlock < n ? b + kDistillBlock : n;
    auto v0 = zero, v1 = zero, v2 = zero;
    ForEachVector(df, b, e, [&](std::size_t i, auto mask, bool full) {
      const auto q = hn::Mul(Load(df, es + i, mask, full), inv_zs);
      const auto p = hn::Mul(Load(df, et + i, mask, full), inv_zt);
      const auto lq = hn::Sub(hn::Mul(Load(df, x + i, mask, full), vsx), lse_s);
      const auto lp = hn::Sub(hn::Mul(Load(df, y + i, mask, full), vsy), lse_t);
      const auto mix = hn::Add(hn::Mul(beta, p), hn::Mul(omb, q));
      const auto mpos = hn::Gt(mix, zero);
      const auto lm = hn::Log(df, hn::IfThenElse(mpos, mix, one));
      v0 = hn::Add(v0, hn::IfThenElseZero(hn::Gt(p, zero), hn::Mul(p, hn::Sub(lp, lm))));
      const auto qpos = hn::Gt(q, zero);
      v1 = hn::Add(v1, hn::IfThenElseZero(qpos, hn::Mul(q, hn::Sub(lq, lm))));
      const auto num = hn::Mul(omb, hn::Add(hn::Mul(va, p), hn::Mul(vb, q)));
      const auto g = hn::IfThenElseZero(
          mpos,
          hn::Sub(hn::Mul(vb, hn::Sub(lq, lm)), hn::Div(num, hn::IfThenElse(mpos, mix, one))));
      v2 = hn::Add(v2, hn::IfThenElseZero(qpos, hn::Mul(q, g)));
      Store(df, g, et + i, mask, full);
    });
    s0 += LaneSum(df, v0);
    s1 += LaneSum(df, v1);
    s2 += LaneSum(df, v2);
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s2;
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
