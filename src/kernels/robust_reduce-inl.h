// Per-target bodies of the coordinate-wise robust aggregates (kernels/robust_reduce.h).

#if defined(EDGEFUSE_SRC_KERNELS_ROBUST_REDUCE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef EDGEFUSE_SRC_KERNELS_ROBUST_REDUCE_INL_H_
#undef EDGEFUSE_SRC_KERNELS_ROBUST_REDUCE_INL_H_
#else
#define EDGEFUSE_SRC_KERNELS_ROBUST_REDUCE_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "edgefuse/kernels/robust_reduce.h"
#include "hwy/highway.h"
#include "src/kernels/robust_keys.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Keys back to the floats they were made from.
template <class DF, class DI>
HWY_INLINE hn::Vec<DF> KeysToFloats(DF df, DI di, hn::Vec<DI> key) {
  return hn::BitCast(df, hn::Xor(key, hn::And(hn::ShiftRight<31>(key), hn::Set(di, 0x7FFFFFFF))));
}

// Elements [b, e) with k <= kMaxNetworkClients: per vector of elements, the k clients' keys are
// sorted by a bubble network of integer min/max (absent clients have the largest key) as far
// as the ranks read, then each lane picks or sums its own ranks.
HWY_INLINE void RobustRange(const float* HWY_RESTRICT values, std::size_t k, std::size_t stride,
                            std::size_t b, std::size_t e, RobustRule rule, const std::int32_t* trim,
                            float* HWY_RESTRICT out, std::uint32_t* HWY_RESTRICT count) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di;
  using VI = hn::Vec<decltype(di)>;
  const std::size_t N = hn::Lanes(df);
  VI keys[detail::kMaxNetworkClients];
  std::size_t i = b;
  for (; i + N <= e; i += N) {
    auto present = hn::Zero(di);
    for (std::size_t j = 0; j < k; ++j) {
      const auto x = hn::LoadU(df, values + j * stride + i);
      const auto absent = hn::IsNaN(x);
      const VI bits = hn::BitCast(di, x);
      // Sortable key: negative floats have their magnitude bits flipped.
      const VI key = hn::Xor(bits, hn::And(hn::ShiftRight<31>(bits), hn::Set(di, 0x7FFFFFFF)));
      keys[j] = hn::IfThenElse(hn::RebindMask(di, absent), hn::Set(di, detail::kAbsentKey), key);
      present =
          hn::Add(present, hn::IfThenElseZero(hn::RebindMask(di, hn::Not(absent)), hn::Set(di, 1)));
    }
    // Only the ranks below `need` are read (up to c/2 for the median, c for the trimmed mean,
    // c the lanes' largest count): pass p floats the smallest key left down to position p, so
    // `need` passes sort that prefix (absent keys, the largest, stay behind it). Sparse
    // coverage (few of the k clients per element) then costs need x k, not k^2 / 2.
    const auto most = static_cast<std::size_t>(hn::GetLane(hn::MaxOfLanes(di, present)));
    const std::size_t need = std::min(k, rule == RobustRule::kMedian ? most / 2 + 1 : most);
    for (std::size_t pass = 0; pass < need && pass + 1 < k; ++pass) {
      for (std::size_t j = k - 1; j > pass; --j) {
        const VI lo = hn::Min(keys[j - 1], keys[j]);
        keys[j] = hn::Max(keys[j - 1], keys[j]);
        keys[j - 1] = lo;
      }
    }
    // Back to floats in sorted order; each lane takes its own ranks.
    auto result = hn::Zero(df);
    if (rule == RobustRule::kMedian) {
      const auto c_odd = hn::Ne(hn::And(present, hn::Set(di, 1)), hn::Zero(di));
      const VI hi_rank = hn::ShiftRight<1>(present);                           // c/2
      const VI lo_rank = hn::ShiftRight<1>(hn::Sub(present, hn::Set(di, 1)));  // (c-1)/2
      auto lo = hn::Zero(df), hi = hn::Zero(df);
      for (std::size_t j = 0; j < need; ++j) {
        const auto v = KeysToFloats(df, di, keys[j]);
        const VI jj = hn::Set(di, static_cast<std::int32_t>(j));
        lo = hn::IfThenElse(hn::RebindMask(df, hn::Eq(jj, lo_rank)), v, lo);
        hi = hn::IfThenElse(hn::RebindMask(df, hn::Eq(jj, hi_rank)), v, hi);
      }
      const auto half = hn::Set(df, 0.5f);
      const auto even = hn::Add(hn::Mul(half, lo), hn::Mul(half, hi));
      result = hn::IfThenElse(hn::RebindMask(df, c_odd), lo, even);
    } else {
      // t = trim[c], lane by lane.
      VI t = hn::Zero(di);
      for (std::size_t cc = 1; cc <= k; ++cc) {
        t = hn::IfThenElse(hn::Eq(present, hn::Set(di, static_cast<std::int32_t>(cc))),
                           hn::Set(di, trim[cc]), t);
      }
      const VI end = hn::Sub(present, t);
      auto sum = hn::Zero(df);
      for (std::size_t j = 0; j < need; ++j) {
        const VI jj = hn::Set(di, static_cast<std::int32_t>(j));
        const auto in = hn::AndNot(hn::Lt(jj, t), hn::Lt(jj, end));  // t <= j < end
        sum =
            hn::Add(sum, hn::IfThenElseZero(hn::RebindMask(df, in), KeysToFloats(df, di, keys[j])));
      }
      result = hn::Div(sum, hn::ConvertTo(df, hn::Sub(end, t)));
    }
    const auto none = hn::RebindMask(df, hn::Eq(present, hn::Zero(di)));
    hn::StoreU(hn::IfThenZeroElse(none, result), df, out + i);
    hn::StoreU(hn::BitCast(hn::RebindToUnsigned<decltype(df)>(), present),
               hn::RebindToUnsigned<decltype(df)>(), count + i);
  }
  std::int32_t scratch[detail::kMaxNetworkClients];
  for (; i < e; ++i) detail::RobustScalar(values, k, stride, i, rule, trim, out, count, scratch);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#endif  // include guard
