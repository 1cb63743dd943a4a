// The noise of DP-FedAvg (aggregate/clipping.h dp_standard_normal, src/aggregate/dp_noise.h).
#include "src/aggregate/dp_noise.h"

#include <Random123/boxmuller.hpp>
#include <Random123/philox.h>

#include "edgefuse/aggregate/clipping.h"

namespace edgefuse {
namespace {

// The two draws of the pair of elements `pair`.
r123::double2 draws(std::uint64_t seed, std::uint64_t round, std::uint32_t tensor,
                    std::uint64_t pair) noexcept {
  using Philox = r123::Philox4x32;
  const Philox::key_type key = {
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  const Philox::ctr_type ctr = {{static_cast<std::uint32_t>(pair),
                                 static_cast<std::uint32_t>(pair >> 32), tensor,
                                 static_cast<std::uint32_t>(round)}};
  const Philox::ctr_type r = Philox()(ctr, key);
  const std::uint64_t u0 = (std::uint64_t{r.v[1]} << 32) | r.v[0];
  const std::uint64_t u1 = (std::uint64_t{r.v[3]} << 32) | r.v[2];
  return r123::boxmuller(u0, u1);
}

}  // namespace

double dp_standard_normal(std::uint64_t seed, std::uint64_t round, std::uint32_t tensor,
                          std::uint64_t element) noexcept {
  const r123::double2 d = draws(seed, round, tensor, element / 2);
  return element % 2 == 0 ? d.x : d.y;
}

namespace detail {

void add_dp_noise(float* acc, const float* wsum, const std::uint32_t* count, std::size_t n,
                  std::uint64_t first_element, std::uint32_t tensor, const ClipOptions& clip) {
  const double sigma = clip.noise_multiplier * clip.norm;
  for (std::size_t i = 0; i < n; ++i) {
    if (count[i] == 0) continue;
    const std::uint64_t e = first_element + i;
    const double xi = dp_standard_normal(clip.seed, clip.round, tensor, e);
    const double noise = sigma / static_cast<double>(count[i]) * xi;
    acc[i] = static_cast<float>(static_cast<double>(acc[i]) + static_cast<double>(wsum[i]) * noise);
  }
}

}  // namespace detail
}  // namespace edgefuse
