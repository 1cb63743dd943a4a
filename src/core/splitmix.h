// Private: SplitMix64 (Steele, Lea, Flood 2014, the generator of Java's SplittableRandom) and
// the seed-plus-key mixing used by every seeded draw (random index plans, DARE masks), so that
// streams named differently are independent and the same name always gives the same stream.
#pragma once

#include <cstdint>
#include <string_view>

namespace edgefuse::detail {

inline constexpr std::uint64_t kSplitMixGamma = 0x9E3779B97F4A7C15ULL;

// SplitMix64's output function.
inline std::uint64_t splitmix_finalize(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The starting state of the stream `key` under `seed`.
inline std::uint64_t stream_state(std::uint64_t seed, std::string_view key) {
  std::uint64_t s = splitmix_finalize(seed + kSplitMixGamma);
  for (unsigned char c : key) s = splitmix_finalize(s ^ c);
  return s;
}

// Output i (0-based) of the SplitMix64 stream starting at `state`, without stepping through
// the ones before it: draws are counter-based, so any thread can make any of them.
inline std::uint64_t splitmix_at(std::uint64_t state, std::uint64_t i) {
  return splitmix_finalize(state + (i + 1) * kSplitMixGamma);
}

}  // namespace edgefuse::detail
