// edgefuse/kernels/accumulate.h — weighted accumulation of client updates into fp32 sums.
//
// The inner step of FedAvg (McMahan et al., AISTATS 2017) and of the coverage-weighted
// aggregation of HeteroFL (Diao et al., ICLR 2021), FedRolex (Alam et al., NeurIPS 2022) and
// FjORD (Horvath et al., NeurIPS 2021): acc += w * x, with x a client's values in f32, bf16 or
// f16 and acc an fp32 accumulator. A sub-model client covers only part of the target, so the
// runs variant scatters its packed values into contiguous runs of the destination (the shape of
// width-slicing and rolling-window plans; a window that wraps around is two runs) and the
// indexed variant into an arbitrary index list (random-subset plans).
//
// Numerics, all variants: each element computes fl(acc + fl(w * x)) in f32, with no FMA
// contraction, so results are bitwise identical on every SIMD target, for any thread count,
// and equal to the scalar loop `acc[i] += w * float(x[i])`. Widening bf16/f16 is exact.
// Runtime SIMD dispatch (Google Highway) happens once per call; the work is split into fixed
// chunks run by parallel_for.
//
//   std::vector<float> acc(n, 0.f);
//   edgefuse::accumulate(acc.data(), client_delta_bf16, n, 0.25f);   // acc += 0.25 * delta
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

// acc[i] += w * x[i] for i in [0, n).
// Throws Error (and writes nothing) if w is not finite, if n > 0 and a pointer is null, or if
// the byte ranges of acc and x overlap. Does not allocate.
void accumulate(float* acc, const float* x, std::size_t n, float w);
void accumulate(float* acc, const BFloat16* x, std::size_t n, float w);
void accumulate(float* acc, const Float16* x, std::size_t n, float w);

// A contiguous stretch of a destination: positions [dst_start, dst_start + length).
struct Run {
  std::size_t dst_start;
  std::size_t length;
};

// Scatters packed values into runs: with offset_k = length_0 + ... + length_{k-1},
//   acc[runs[k].dst_start + j] += w * x[offset_k + j]   for j in [0, runs[k].length).
// x holds exactly sum(length_k) = x_len values, in run order (runs need not be sorted: the
// wrap-around window {(90, 10), (0, 20)} of a 100-long axis is valid).
// Throws Error (and writes nothing) if w is not finite; a run has length 0 or ends past
// acc_len; two runs overlap in the destination; the lengths do not sum to x_len; a pointer is
// null where elements exist; acc and x overlap. Allocates O(num_runs) for validation.
void accumulate_runs(float* acc, std::size_t acc_len, const float* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w);
void accumulate_runs(float* acc, std::size_t acc_len, const BFloat16* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w);
void accumulate_runs(float* acc, std::size_t acc_len, const Float16* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w);

// Scatters packed values to an index list: acc[index[i]] += w * x[i] for i in [0, n).
// Throws Error (and writes nothing) if w is not finite, an index is >= acc_len, an index
// repeats, a pointer is null where elements exist, or acc overlaps x or index.
// Strictly increasing index lists (what plans produce) are validated in one pass with no
// allocation; other lists allocate a bitmap of acc_len bits to find repeats.
void accumulate_indexed(float* acc, std::size_t acc_len, const float* x, const std::uint32_t* index,
                        std::size_t n, float w);
void accumulate_indexed(float* acc, std::size_t acc_len, const BFloat16* x,
                        const std::uint32_t* index, std::size_t n, float w);
void accumulate_indexed(float* acc, std::size_t acc_len, const Float16* x,
                        const std::uint32_t* index, std::size_t n, float w);

}  // namespace edgefuse
