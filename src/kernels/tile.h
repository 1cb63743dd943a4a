// Private: the kernels of the aggregator's tile loop (src/aggregate/tile_loop.cc). They run on
// the calling thread (the tiles are already spread over the threads) and skip the public
// entry points' argument checks, since the buffers and lists are the aggregator's own and
// the checks would run once per tile or row segment.
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/kernels/finalize.h"
#include "edgefuse/kernels/scatter.h"
#include "edgefuse/kernels/server_step.h"

namespace edgefuse {

struct FinalizeTally {
  std::uint64_t covered;  // elements with wsum > 0
  bool nonfinite;         // the result of one of them is NaN, +-Inf or out of the output's range
};

namespace detail {

// p[i] = v for i < n (bit for bit: -0.0f stays -0.0f) in full-width SIMD stores (the
// compiler's own loop for std::fill_n is built for the baseline target, 16 bytes a store).
// Clears the tile sums. p may be unaligned; does not allocate.
void fill_f32(float* p, std::size_t n, float v);

// scatter_accumulate(acc, wsum, count, tile_rows, row_len, sources, num_sources) on this
// thread, the sources taken as valid (kernels/scatter.h lists what that means).
void scatter_tile(float* acc, float* wsum, std::uint32_t* count, std::size_t tile_rows,
                  std::size_t row_len, const ScatterSource* sources, std::size_t num_sources);

// finalize(out, base, acc, wsum, n, mode, lr) on this thread, the arguments taken as valid,
// that also returns the number of i with wsum[i] > 0 (the elements it finalises: the
// coverage report without a second pass over the weights) and whether the f32 result of one
// of them is NaN or +-Inf or rounds to +-Inf in the output type (bf16 from 0x7F7F8000 up, f16
// from 65520): the fused finiteness check (AggregateOptions::finite_check), since a client
// value that is NaN or +-Inf leaves its element's sum non-finite, and the overflow check (a
// sum, a mean times the server learning rate or a target plus its update that leaves the
// range).
FinalizeTally finalize_tally(float* out, const float* base, const float* acc, const float* wsum,
                             std::size_t n, FinalizeMode mode, float lr);
FinalizeTally finalize_tally(BFloat16* out, const BFloat16* base, const float* acc,
                             const float* wsum, std::size_t n, FinalizeMode mode, float lr);
FinalizeTally finalize_tally(Float16* out, const Float16* base, const float* acc, const float* wsum,
                             std::size_t n, FinalizeMode mode, float lr);

// server_step(out, base, acc, wsum, m, v, n, step) on this thread, the arguments taken as
// valid (checked in DASSERT builds). Returns the covered elements.
std::size_t server_step_here(float* out, const float* base, const float* acc, const float* wsum,
                             float* m, float* v, std::size_t n, const ServerStep& step);
std::size_t server_step_here(BFloat16* out, const BFloat16* base, const float* acc,
                             const float* wsum, float* m, float* v, std::size_t n,
                             const ServerStep& step);
std::size_t server_step_here(Float16* out, const Float16* base, const float* acc, const float* wsum,
                             float* m, float* v, std::size_t n, const ServerStep& step);

}  // namespace detail
}  // namespace edgefuse
