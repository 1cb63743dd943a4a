// Private: counter-based uniform values for simulations (`edgefuse simulate`) and tests.
//
// Value i of stream `key` depends only on (key, i), so any tile of a generated tensor can be
// made on its own, in any order and on any thread, with the same bits. The hash is Chris
// Wellons' "lowbias32" integer mixer (hash-prospector, 2018) applied to the low 32 bits of
// the counter XOR a per-(key, high 32 bits) word; its top 24 bits, as a signed integer,
// give a multiple of 2^-23 in [-1, 1), times `scale` (one f32 rounding).
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefuse::detail {

// dst[j] = scale * u(key, start + j) for j < n (SIMD, runtime dispatch).
void generate_uniform(float* dst, std::size_t n, std::uint64_t key, std::uint64_t start,
                      float scale);
// The scalar definition: scale * u(key, index).
float uniform_at(std::uint64_t key, std::uint64_t index, float scale);

inline std::uint32_t lowbias32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The word XORed into the low 32 counter bits for a key and the counter's high 32 bits.
inline std::uint32_t stream_word(std::uint64_t key, std::uint32_t hi) {
  return lowbias32(static_cast<std::uint32_t>(key) ^
                   lowbias32(hi ^ static_cast<std::uint32_t>(key >> 32) ^ 0x9e3779b9U));
}

}  // namespace edgefuse::detail
