// Dispatch unit for the non-finite scans of src/kernels/nonfinite.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/nonfinite.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#include <cstddef>
#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Index of the first p[i] with (p[i] & exp) == exp (all exponent bits set: Inf or NaN), or
// n. Blocks are OR-reduced without branches; only a block with a hit is searched one by one.
template <typename T>
HWY_INLINE std::size_t FirstAllOnes(const T* HWY_RESTRICT p, std::size_t n, T exp) {
  const hn::ScalableTag<T> d;
  const std::size_t N = hn::Lanes(d);
  const auto ve = hn::Set(d, exp);
  constexpr std::size_t kBlock = 4096;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t e = b + kBlock < n ? b + kBlock : n;
    auto hit = hn::Zero(d);
    std::size_t i = b;
    for (; i + 2 * N <= e; i += 2 * N) {
      const auto a0 = hn::And(hn::LoadU(d, p + i), ve);
      const auto a1 = hn::And(hn::LoadU(d, p + i + N), ve);
      hit = hn::Or(hit,
                   hn::Or(hn::VecFromMask(d, hn::Eq(a0, ve)), hn::VecFromMask(d, hn::Eq(a1, ve))));
    }
    bool any = !hn::AllFalse(d, hn::MaskFromVec(hit));
    for (; i < e && !any; ++i) any = (p[i] & exp) == exp;
    if (any) {
      for (std::size_t k = b; k < e; ++k) {
        if ((p[k] & exp) == exp) return k;
      }
    }
  }
  return n;
}

std::size_t FirstAllOnesU16(const std::uint16_t* p, std::size_t n, std::uint16_t exp) {
  return FirstAllOnes(p, n, exp);
}
std::size_t FirstAllOnesU32(const std::uint32_t* p, std::size_t n, std::uint32_t exp) {
  return FirstAllOnes(p, n, exp);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <atomic>

#include "edgefuse/core/parallel.h"
#include "src/kernels/nonfinite.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(FirstAllOnesU16);
HWY_EXPORT(FirstAllOnesU32);

namespace detail {
namespace {

// Chunks of 1 Mi elements in parallel; the lowest hit wins whichever thread finds it, and a
// chunk past a hit already found is skipped (it cannot hold a lower one).
template <typename T>
std::size_t first_all_ones(std::size_t (*kernel)(const T*, std::size_t, T), const T* p,
                           std::size_t n, T exp) {
  if (n == 0) return kNoIndex;
  check_pointer("first_nonfinite", "p", p, n);
  constexpr std::size_t kGrain = std::size_t{1} << 20;
  if (n <= kGrain) {
    const std::size_t i = kernel(p, n, exp);
    return i == n ? kNoIndex : i;
  }
  std::atomic<std::size_t> best{kNoIndex};
  parallel_for(n, kGrain, [&](std::size_t b, std::size_t e) {
    if (best.load(std::memory_order_relaxed) < b) return;
    const std::size_t i = kernel(p + b, e - b, exp);
    if (i == e - b) return;
    std::size_t cur = best.load(std::memory_order_relaxed);
    while (b + i < cur && !best.compare_exchange_weak(cur, b + i, std::memory_order_relaxed)) {
    }
  });
  return best.load();
}

}  // namespace

std::size_t first_nonfinite_bits(const std::uint16_t* p, std::size_t n, std::uint16_t exp) {
  init_dispatch();
  return first_all_ones(&HWY_DYNAMIC_DISPATCH(FirstAllOnesU16), p, n, exp);
}
std::size_t first_nonfinite_bits(const std::uint32_t* p, std::size_t n, std::uint32_t exp) {
  init_dispatch();
  return first_all_ones(&HWY_DYNAMIC_DISPATCH(FirstAllOnesU32), p, n, exp);
}

}  // namespace detail
}  // namespace edgefuse
#endif  // HWY_ONCE
