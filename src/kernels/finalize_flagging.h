// Private: finalize() (kernels/finalize.h) that also counts the covered elements and says
// whether a sum it divided was NaN or +-Inf, for the aggregator: the count is its coverage
// report without a second pass over the weights, and the flag its fused finiteness check
// (AggregateOptions::finite_check): a client value that is NaN or +-Inf leaves its element's
// sum non-finite, so checking the sums as they are finalised finds it without a second read
// of the updates.
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/kernels/finalize.h"

namespace edgefuse {

struct FinalizeTally {
  std::uint64_t covered;  // elements with wsum > 0
  bool nonfinite;         // acc is NaN or +-Inf in one of them
};

namespace detail {

// finalize(out, base, acc, wsum, n, mode, lr), with the same checks and errors; returns the
// number of i with wsum[i] > 0 (the elements it finalises) and whether acc[i] is NaN or +-Inf
// for one of them.
FinalizeTally finalize_flagging(float* out, const float* base, const float* acc, const float* wsum,
                       std::size_t n, FinalizeMode mode, float lr);
FinalizeTally finalize_flagging(BFloat16* out, const BFloat16* base, const float* acc, const float* wsum,
                       std::size_t n, FinalizeMode mode, float lr);
FinalizeTally finalize_flagging(Float16* out, const Float16* base, const float* acc, const float* wsum,
                       std::size_t n, FinalizeMode mode, float lr);

}  // namespace detail
}  // namespace edgefuse
