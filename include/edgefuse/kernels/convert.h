// edgefuse/kernels/convert.h — bulk f32 <-> bf16 / f16 conversion with SIMD.
//
// The array forms of the scalar conversions in core/dtype.h, with the same rules: widening is
// exact; narrowing rounds to nearest even, overflows to +-Inf, keeps subnormals and keeps NaN
// a (quiet) NaN with its sign. Highway's own DemoteTo truncates bf16 and, without F16C, f16,
// so these kernels do the rounding in integer lanes and agree bit for bit with the scalar
// functions on every target.
//
//   edgefuse::convert(src_f32, dst_bf16, n);
#pragma once

#include <cstddef>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

// dst[i] = src[i] converted, for i in [0, n). Throws Error if n > 0 and a pointer is null, or
// the two ranges overlap. Does not allocate.
void convert(const float* src, BFloat16* dst, std::size_t n);
void convert(const float* src, Float16* dst, std::size_t n);
void convert(const BFloat16* src, float* dst, std::size_t n);
void convert(const Float16* src, float* dst, std::size_t n);

}  // namespace edgefuse
