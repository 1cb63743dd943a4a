// Centered clipping's coefficients (aggregate/centered_clip.h).
#include "edgefuse/aggregate/centered_clip.h"

#include <algorithm>
#include <cmath>

#include "edgefuse/core/error.h"

namespace edgefuse {

void check_centered_clip_options(const CenteredClipOptions& o) {
  if (!(o.tau > 0.0) || !std::isfinite(o.tau)) {
    detail::fail("centered_clip: tau = ", o.tau, " must be > 0 and finite");
  }
  if (o.iterations == 0) detail::fail("centered_clip: iterations must be >= 1");
}

CenteredClipResult centered_clip_coefficients(const std::vector<double>& gram,
                                              const std::vector<double>& weights,
                                              const CenteredClipOptions& o) {
  const std::size_t k = weights.size();
  check_centered_clip_options(o);
  if (gram.size() != k * k) {
    detail::fail("centered_clip: a Gram matrix of ", gram.size(), " entries for ", k, " clients");
  }
  double total = 0.0;
  for (const double w : weights) total += w;
  if (!(total > 0.0) || !std::isfinite(total)) {
    detail::fail("centered_clip: the client weights sum to ", total);
  }
  CenteredClipResult r;
  r.coefficients.assign(k, 0.0);
  r.distances.assign(k, 0.0);
  r.factors.assign(k, 1.0);
  std::vector<double> ga(k);
  for (std::size_t it = 0; it < o.iterations; ++it) {
    const std::vector<double>& a = r.coefficients;
    double aga = 0.0;
    for (std::size_t i = 0; i < k; ++i) {
      double s = 0.0;
      for (std::size_t j = 0; j < k; ++j) s += gram[i * k + j] * a[j];
      ga[i] = s;
      aga += a[i] * s;
    }
    double taken = 0.0;
    for (std::size_t i = 0; i < k; ++i) {
      const double d2 = gram[i * k + i] - 2.0 * ga[i] + aga;
      r.distances[i] = std::sqrt(std::max(d2, 0.0));
      r.factors[i] = r.distances[i] > o.tau ? o.tau / r.distances[i] : 1.0;
      taken += weights[i] / total * r.factors[i];
    }
    for (std::size_t i = 0; i < k; ++i) {
      r.coefficients[i] = (1.0 - taken) * a[i] + weights[i] / total * r.factors[i];
    }
  }
  return r;
}

}  // namespace edgefuse
