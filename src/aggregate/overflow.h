// Private: the elements of a tile whose f32 result is NaN, Inf or outside the output dtype's
// range, computed again.
//
// The tile is first summed again with its weights scaled by a power of two that brings
// their total to at most 1 (a weighted sum of finite values then stays within the range of
// its largest value, and the mean is unchanged); each such element is then computed in
// double from those sums. One that still does not fit is an Error naming the tensor and
// element, unless a client whose values were not checked yet may hold a NaN or Inf: the
// round is then computed again without that client (saw_nonfinite is set).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "edgefuse/aggregate/options.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse::detail {

// "[i, j]": the index of flat element `flat` of `shape`, for messages.
std::string element_text(const Shape& shape, std::uint64_t flat);

// A power of two 2^-k with total_weight times it at most 1 (k <= 126).
float overflow_scale(double total_weight);

struct OverflowContext {
  const TensorMeta* tensor;
  AggregateMode mode;
  float server_lr;
  bool clients_pending;
  std::atomic<bool>* saw_nonfinite;
};

// Elements [off, off + len) of a tile that starts at flat element `tile_start` of the
// tensor: out and base in the tensor's dtype, acc and wsum the sums at scaled weights.
void refinalize_overflowed(const OverflowContext& ctx, std::byte* out, const std::byte* base,
                           const float* acc, const float* wsum, std::size_t off, std::size_t len,
                           std::uint64_t tile_start);

}  // namespace edgefuse::detail
