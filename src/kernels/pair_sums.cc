// Dispatch unit of the Krum statistics' f64 sums (src/kernels/pair_sums.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/pair_sums.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Running sums s0..s3 as two vectors of two f64 lanes: lanes (0, 1) take elements 4i and
// 4i + 1, lanes (2, 3) elements 4i + 2 and 4i + 3. With `pair`, d = x - y; else d = x.
template <bool kPair>
void SumsF32(const float* HWY_RESTRICT x, const float* HWY_RESTRICT y, std::size_t n,
             double* HWY_RESTRICT sums, double* HWY_RESTRICT counts) {
#if HWY_TARGET == HWY_SCALAR  // no 2-lane vectors: the same sums one element at a time
  for (std::size_t l = 0; l < 4; ++l) sums[l] = counts[l] = 0.0;
  for (std::size_t e = 0; e < n; ++e) {
    double d = static_cast<double>(x[e]);
    if (kPair) d = d - static_cast<double>(y[e]);
    if (d == d) {
      sums[e % 4] += d * d;
      counts[e % 4] += 1.0;
    }
  }
#else
  const hn::FixedTag<double, 2> dd;
  const hn::FixedTag<float, 2> df;
  auto s01 = hn::Zero(dd), s23 = hn::Zero(dd), c01 = hn::Zero(dd), c23 = hn::Zero(dd);
  const auto one = hn::Set(dd, 1.0);
  const std::size_t body = n & ~std::size_t{3};
  for (std::size_t e = 0; e < body; e += 4) {
    auto d01 = hn::PromoteTo(dd, hn::LoadU(df, x + e));
    auto d23 = hn::PromoteTo(dd, hn::LoadU(df, x + e + 2));
    if (kPair) {
      d01 = hn::Sub(d01, hn::PromoteTo(dd, hn::LoadU(df, y + e)));
      d23 = hn::Sub(d23, hn::PromoteTo(dd, hn::LoadU(df, y + e + 2)));
    }
    const auto m01 = hn::Eq(d01, d01), m23 = hn::Eq(d23, d23);  // false for NaN
    s01 = hn::Add(s01, hn::IfThenElseZero(m01, hn::Mul(d01, d01)));
    s23 = hn::Add(s23, hn::IfThenElseZero(m23, hn::Mul(d23, d23)));
    c01 = hn::Add(c01, hn::IfThenElseZero(m01, one));
    c23 = hn::Add(c23, hn::IfThenElseZero(m23, one));
  }
  hn::StoreU(s01, dd, sums);
  hn::StoreU(s23, dd, sums + 2);
  hn::StoreU(c01, dd, counts);
  hn::StoreU(c23, dd, counts + 2);
  for (std::size_t e = body; e < n; ++e) {
    double d = static_cast<double>(x[e]);
    if (kPair) d = d - static_cast<double>(y[e]);
    if (d == d) {
      sums[e - body] += d * d;
      counts[e - body] += 1.0;
    }
  }
#endif
}

void PairSumsF32(const float* x, const float* y, std::size_t n, double* sums, double* counts) {
  SumsF32<true>(x, y, n, sums, counts);
}
void SquareSumF32(const float* x, std::size_t n, double* sums, double* counts) {
  SumsF32<false>(x, nullptr, n, sums, counts);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "src/kernels/dispatch.h"
#include "src/kernels/pair_sums.h"

namespace edgefuse {

HWY_EXPORT(PairSumsF32);
HWY_EXPORT(SquareSumF32);

namespace detail {

PairSums pair_sums(const float* x, const float* y, std::size_t n) {
  double s[4], c[4];  // counts are exact in f64 below 2^53
  init_dispatch();
  HWY_DYNAMIC_DISPATCH(PairSumsF32)(x, y, n, s, c);
  return {(s[0] + s[1]) + (s[2] + s[3]), static_cast<std::uint64_t>((c[0] + c[1]) + (c[2] + c[3]))};
}

double square_sum(const float* x, std::size_t n) {
  double s[4], c[4];
  init_dispatch();
  HWY_DYNAMIC_DISPATCH(SquareSumF32)(x, n, s, c);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

}  // namespace detail
}  // namespace edgefuse
#endif  // HWY_ONCE
