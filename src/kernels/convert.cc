// Dispatch unit for the bulk f32 <-> bf16 / f16 conversions (kernels/convert.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/convert.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

void ConvertF32ToBF16(const float* src, BFloat16* dst, std::size_t n) { ConvertArray(src, dst, n); }
void ConvertF32ToF16(const float* src, Float16* dst, std::size_t n) { ConvertArray(src, dst, n); }
void ConvertBF16ToF32(const BFloat16* src, float* dst, std::size_t n) { ConvertArray(src, dst, n); }
void ConvertF16ToF32(const Float16* src, float* dst, std::size_t n) { ConvertArray(src, dst, n); }

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/convert.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(ConvertF32ToBF16);
HWY_EXPORT(ConvertF32ToF16);
HWY_EXPORT(ConvertBF16ToF32);
HWY_EXPORT(ConvertF16ToF32);

namespace {

template <typename From, typename To>
void convert_checked(void (*kernel)(const From*, To*, std::size_t), const From* src, To* dst,
                     std::size_t n) {
  detail::check_pointer("convert", "src", src, n);
  detail::check_pointer("convert", "dst", dst, n);
  detail::check_disjoint("convert", "src", src, n * sizeof(From), "dst", dst, n * sizeof(To));
  parallel_for(n, detail::kStreamGrain,
               [&](std::size_t b, std::size_t e) { kernel(src + b, dst + b, e - b); });
}

}  // namespace

void convert(const float* src, BFloat16* dst, std::size_t n) {
  detail::init_dispatch();
  convert_checked(&HWY_DYNAMIC_DISPATCH(ConvertF32ToBF16), src, dst, n);
}
void convert(const float* src, Float16* dst, std::size_t n) {
  detail::init_dispatch();
  convert_checked(&HWY_DYNAMIC_DISPATCH(ConvertF32ToF16), src, dst, n);
}
void convert(const BFloat16* src, float* dst, std::size_t n) {
  detail::init_dispatch();
  convert_checked(&HWY_DYNAMIC_DISPATCH(ConvertBF16ToF32), src, dst, n);
}
void convert(const Float16* src, float* dst, std::size_t n) {
  detail::init_dispatch();
  convert_checked(&HWY_DYNAMIC_DISPATCH(ConvertF16ToF32), src, dst, n);
}

}  // namespace edgefuse
#endif  // HWY_ONCE
