// Adaptive clipping's next norm (aggregate/clipping.h).
#include "edgefuse/aggregate/clipping.h"

#include <cmath>

#include "edgefuse/core/error.h"

namespace edgefuse {

double adaptive_clip_norm(double norm, double lr, double quantile, double unclipped_fraction) {
  if (!(norm > 0.0) || !std::isfinite(norm)) detail::fail("clip: norm = ", norm, " must be > 0");
  if (!std::isfinite(unclipped_fraction)) {
    detail::fail("clip: the unclipped fraction ", unclipped_fraction, " is not finite");
  }
  return norm * std::exp(-lr * (unclipped_fraction - quantile));
}

}  // namespace edgefuse
