// Private helpers shared by the kernel dispatch translation units (not installed).
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/core/error.h"
#include "hwy/targets.h"

namespace edgefuse {
namespace detail {

// Elements per parallel_for chunk in the streaming kernels: 64 Ki f32 = 256 KiB of
// accumulator, large enough to amortise the pool hand-off, small enough that 2+ threads
// share a 10M-element tensor evenly. Results never depend on it (element-wise kernels).
inline constexpr std::size_t kStreamGrain = std::size_t{1} << 16;

// Makes HWY_DYNAMIC_DISPATCH return the chosen target's function (not the one-time
// initialisation stub), so a kernel pointer can be fetched once and called per chunk.
inline void init_dispatch() {
  auto& chosen = hwy::GetChosenTarget();
  if (!chosen.IsInitialized()) chosen.Update(hwy::SupportedTargets());
}

inline void check_finite(const char* fn, const char* name, float v) {
  if (!(v - v == 0.0f)) fail(fn, ": ", name, " = ", v, " is not finite");
}

inline void check_pointer(const char* fn, const char* name, const void* p, std::size_t n) {
  if (n != 0 && p == nullptr) fail(fn, ": ", name, " is null but ", n, " elements were given");
}

// Throws if the byte ranges [a, a + a_bytes) and [b, b + b_bytes) intersect.
inline void check_disjoint(const char* fn, const char* a_name, const void* a, std::size_t a_bytes,
                           const char* b_name, const void* b, std::size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return;
  const auto pa = reinterpret_cast<std::uintptr_t>(a);
  const auto pb = reinterpret_cast<std::uintptr_t>(b);
  if (pa < pb + b_bytes && pb < pa + a_bytes) {
    fail(fn, ": ", a_name, " and ", b_name, " overlap in memory (", a_bytes, " bytes at ", a,
         " and ", b_bytes, " bytes at ", b, ")");
  }
}

}  // namespace detail
}  // namespace edgefuse
