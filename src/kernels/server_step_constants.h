// Private: the constants of a server optimizer step as the per-target kernels take them
// (kernels/server_step.h), with 1 - b1 and 1 - b2 rounded once to f32.
#pragma once

namespace edgefuse::detail {

struct StepConstants {
  float lr, mu, b1, c1, b2, c2, tau;
};

}  // namespace edgefuse::detail
