// edgefuse/kernels/server_step.h — a server optimizer's step on the fused pseudo-gradient.
//
// After a round's clients are summed (acc = sum_k w_k x_k, wsum = sum_k w_k per element), the
// pseudo-gradient of a covered element (wsum > 0) is the weighted mean of the clients' deltas,
// d = acc / wsum (delta mode), or the mean of their weights minus the target, d = acc / wsum - w
// (params mode). The server then takes one optimizer step on W with per-element f32 state:
//   kFedAvgM    m <- mu*m + d;                       W <- W + lr*m
//   kFedAdam    m <- b1*m + (1-b1)*d;  v <- b2*v + (1-b2)*d*d;              W <- W +
//   lr*m/(sqrt(v)+tau) kFedYogi    m as Adam;  v <- v - (1-b2)*d*d*sign(v - d*d);             W as
//   Adam kFedAdagrad m as Adam;  v <- v + d*d;                                   W as Adam
//   kNesterov   g = -d;  m <- mu*m + g;  W <- W - lr*(g + mu*m)   (PyTorch's SGD convention; the
//               DiLoCo outer step)
// (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2; Hsu et al. 2019 for
// server momentum; Douillard et al., DiLoCo, 2023.) Flower's bias correction scales lr by
// sqrt(1 - b2^t) / (1 - b1^t): a per-round factor the caller folds into lr.
//
// Elements no client covers (wsum <= 0 or NaN) keep W and their state bit for bit, and so does a
// covered element whose step is zero (lr*... == 0, so -0 stays -0).
//
// Numerics: f32 in the order written, with (1-b1), (1-b2) and sqrt, division and products
// rounded as IEEE f32 (no FMA, no reciprocal estimate), then one rounding of W to its dtype.
// Bitwise identical on every SIMD target and thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

enum class ServerRule : std::uint8_t { kFedAvgM, kFedAdam, kFedYogi, kFedAdagrad, kNesterov };

struct ServerStep {
  ServerRule rule = ServerRule::kFedAdam;
  bool delta = true;      // clients sent deltas (else weights)
  float lr = 1.0f;        // > 0
  float momentum = 0.9f;  // mu of kFedAvgM and kNesterov, in [0, 1)
  float beta1 = 0.9f;     // the adaptive rules, in [0, 1)
  float beta2 = 0.99f;    // in [0, 1)
  float tau = 1e-3f;      // > 0
};

// One step over n elements: out (may be base itself) the new W; m and v the state, updated in
// place (v is not read or written by kFedAvgM and kNesterov and may be null there). Returns the
// number of covered elements. Throws Error (writing nothing) for a parameter outside its range
// or not finite, a null pointer while n > 0, or arrays that overlap (other than out == base).
std::size_t server_step(float* out, const float* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step);
std::size_t server_step(BFloat16* out, const BFloat16* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step);
std::size_t server_step(Float16* out, const Float16* base, const float* acc, const float* wsum,
                        float* m, float* v, std::size_t n, const ServerStep& step);

}  // namespace edgefuse
