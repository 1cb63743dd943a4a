// Dispatch unit and argument checks for kernels/lora_update.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/lora_update.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/lora_update-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

// One wrapper per element type: Highway 1.0.3 has no HWY_EXPORT_T.
void LoraUpdateF32(float* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                   std::size_t cols, std::size_t rank, float scale) {
  LoraUpdateRows(w, ldw, l, rt, rows, cols, rank, scale);
}
void LoraUpdateBF16(BFloat16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                    std::size_t cols, std::size_t rank, float scale) {
  LoraUpdateRows(w, ldw, l, rt, rows, cols, rank, scale);
}
void LoraUpdateF16(Float16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                   std::size_t cols, std::size_t rank, float scale) {
  LoraUpdateRows(w, ldw, l, rt, rows, cols, rank, scale);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>

#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/lora_update.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(LoraUpdateF32);
HWY_EXPORT(LoraUpdateBF16);
HWY_EXPORT(LoraUpdateF16);

namespace {

template <typename T>
using LoraKernel = void (*)(T*, std::size_t, const float*, const float*, std::size_t, std::size_t,
                            std::size_t, float);

template <typename T>
void lora_update_checked(LoraKernel<T> kernel, T* w, std::size_t ldw, const float* l,
                         const float* rt, std::size_t rows, std::size_t cols, std::size_t rank,
                         float scale) {
  constexpr const char* kFn = "lora_update";
  detail::check_finite(kFn, "scale", scale);
  if (rows == 0 || cols == 0) return;
  if (ldw < cols) detail::fail(kFn, ": ldw = ", ldw, " is less than cols = ", cols);
  detail::check_pointer(kFn, "w", w, rows * ldw);
  if (rank == 0) return;
  detail::check_pointer(kFn, "l", l, rows * rank);
  detail::check_pointer(kFn, "rt", rt, rank * cols);
  const std::size_t w_bytes = ((rows - 1) * ldw + cols) * sizeof(T);
  detail::check_disjoint(kFn, "w", w, w_bytes, "l", l, rows * rank * sizeof(float));
  detail::check_disjoint(kFn, "w", w, w_bytes, "rt", rt, rank * cols * sizeof(float));
  // Row blocks of about 64 Ki outputs: enough work per hand-off, and a block's W (256 KiB in
  // f32) stays in L2 while the column strips walk it.
  const std::size_t grain = std::max<std::size_t>(2, (std::size_t{1} << 16) / cols);
  parallel_for(rows, grain, [&](std::size_t b, std::size_t e) {
    kernel(w + b * ldw, ldw, l + b * rank, rt, e - b, cols, rank, scale);
  });
}

}  // namespace

void lora_update(float* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale) {
  detail::init_dispatch();
  lora_update_checked(&HWY_DYNAMIC_DISPATCH(LoraUpdateF32), w, ldw, l, rt, rows, cols, rank, scale);
}
void lora_update(BFloat16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale) {
  detail::init_dispatch();
  lora_update_checked(&HWY_DYNAMIC_DISPATCH(LoraUpdateBF16), w, ldw, l, rt, rows, cols, rank,
                      scale);
}
void lora_update(Float16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale) {
  detail::init_dispatch();
  lora_update_checked(&HWY_DYNAMIC_DISPATCH(LoraUpdateF16), w, ldw, l, rt, rows, cols, rank, scale);
}

}  // namespace edgefuse
#endif  // HWY_ONCE
