// Dispatch unit for the counter-based generator (src/kernels/generate.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/generate.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/generate.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// n values whose low counter words are lo, lo + 1, ... (no wrap inside the call).
void GenerateUniform(float* HWY_RESTRICT dst, std::size_t n, std::uint32_t word, std::uint32_t lo,
                     float scale) {
  const hn::ScalableTag<std::uint32_t> du;
  const hn::ScalableTag<std::int32_t> di;
  const hn::ScalableTag<float> df;
  const std::size_t N = hn::Lanes(du);
  const auto m1 = hn::Set(du, 0x7feb352dU), m2 = hn::Set(du, 0x846ca68bU);
  const auto vword = hn::Set(du, word);
  const auto step = hn::Set(du, static_cast<std::uint32_t>(N));
  const auto unit = hn::Set(df, scale * (1.0f / 8388608.0f));
  auto ctr = hn::Add(hn::Set(du, lo), hn::Iota(du, 0));
  std::size_t i = 0;
  for (; i + N <= n; i += N) {
    auto x = hn::Xor(ctr, vword);
    x = hn::Xor(x, hn::ShiftRight<16>(x));
    x = hn::Mul(x, m1);
    x = hn::Xor(x, hn::ShiftRight<15>(x));
    x = hn::Mul(x, m2);
    x = hn::Xor(x, hn::ShiftRight<16>(x));
    const auto v = hn::ConvertTo(df, hn::ShiftRight<8>(hn::BitCast(di, x)));
    hn::StoreU(hn::Mul(v, unit), df, dst + i);
    ctr = hn::Add(ctr, step);
  }
  for (; i < n; ++i) {
    const std::uint32_t h = detail::lowbias32((lo + static_cast<std::uint32_t>(i)) ^ word);
    dst[i] = static_cast<float>(static_cast<std::int32_t>(h) >> 8) * (scale * (1.0f / 8388608.0f));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>

#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(GenerateUniform);

namespace detail {

float uniform_at(std::uint64_t key, std::uint64_t index, float scale) {
  const std::uint32_t h = lowbias32(static_cast<std::uint32_t>(index) ^
                                    stream_word(key, static_cast<std::uint32_t>(index >> 32)));
  return static_cast<float>(static_cast<std::int32_t>(h) >> 8) * (scale * (1.0f / 8388608.0f));
}

void generate_uniform(float* dst, std::size_t n, std::uint64_t key, std::uint64_t start,
                      float scale) {
  check_pointer("generate_uniform", "dst", dst, n);
  init_dispatch();
  auto* kernel = &HWY_DYNAMIC_DISPATCH(GenerateUniform);
  while (n > 0) {  // one call per stretch of equal high counter words
    const auto hi = static_cast<std::uint32_t>(start >> 32);
    const auto lo = static_cast<std::uint32_t>(start);
    const std::size_t len =
        static_cast<std::size_t>(std::min<std::uint64_t>(n, (std::uint64_t{1} << 32) - lo));
    kernel(dst, len, stream_word(key, hi), lo, scale);
    dst += len;
    n -= len;
    start += len;
  }
}

}  // namespace detail
}  // namespace edgefuse
#endif  // HWY_ONCE
