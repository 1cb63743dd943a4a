// edgefuse/kernels/finalize.h — turn fp32 sums into the new target values.
//
// After every client has been accumulated (kernels/accumulate.h), each target element holds
// acc = sum_k w_k x_k over the clients k that cover it and wsum = sum_k w_k. Finalize writes
// the coverage-weighted mean, as in HeteroFL (Diao et al., ICLR 2021) and FedRolex (Alam et
// al., NeurIPS 2022): elements that no client covers (wsum <= 0, or NaN) keep their old value
// bit for bit.
//   kDelta:   out = wsum > 0 ? base + lr * (acc / wsum) : base    (clients sent deltas;
//             a zero increment lr * (acc / wsum) keeps base's bits, so -0 stays -0)
//   kReplace: out = wsum > 0 ? acc / wsum : base                  (clients sent weights)
// With lr = 1 the delta mode is FedAvg; other lr values are a server learning rate on the
// pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
//
// Numerics: f32 arithmetic in the order written (IEEE division, no FMA contraction), one
// rounding to the output dtype with round-to-nearest-even; values beyond the output range
// become +-Inf as IEEE conversion does. Bitwise identical on every SIMD target and thread count.
//
//   edgefuse::finalize(w_bf16, w_bf16, acc, wsum, n, edgefuse::FinalizeMode::kDelta, 1.0f);
#pragma once

#include <cstddef>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

enum class FinalizeMode { kDelta, kReplace };

// out[i] as above for i in [0, n). out may be base itself (in place) but must not otherwise
// overlap base, acc or wsum. Throws Error (and writes nothing) if lr is not finite, a pointer
// is null while n > 0, or out overlaps another argument other than being exactly base.
// `lr` is ignored in kReplace mode. Does not allocate.
void finalize(float* out, const float* base, const float* acc, const float* wsum, std::size_t n,
              FinalizeMode mode, float lr = 1.0f);
void finalize(BFloat16* out, const BFloat16* base, const float* acc, const float* wsum,
              std::size_t n, FinalizeMode mode, float lr = 1.0f);
void finalize(Float16* out, const Float16* base, const float* acc, const float* wsum, std::size_t n,
              FinalizeMode mode, float lr = 1.0f);

}  // namespace edgefuse
