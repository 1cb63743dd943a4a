// Test-only references, written independently of the library: 16-bit float decoding and
// round-to-nearest-even computed in double precision by comparing candidate neighbours,
// and a loop over every Highway target this machine supports.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "hwy/targets.h"

namespace edgefuse_test {

inline std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline std::uint64_t bits_of64(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}
inline float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Value of a binary format with `exp_bits` exponent bits and `man_bits` mantissa bits.
// An all-ones exponent decodes as 2^(emax+1) (the "next binade", used as the Inf
// candidate when rounding); callers handle real Inf/NaN separately.
inline double decode(std::uint32_t bits, int exp_bits, int man_bits) {
  const std::uint32_t man = bits & ((1u << man_bits) - 1u);
  const std::uint32_t exp = (bits >> man_bits) & ((1u << exp_bits) - 1u);
  const bool neg = (bits >> (man_bits + exp_bits)) & 1u;
  const int bias = (1 << (exp_bits - 1)) - 1;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), 1 - bias - man_bits);
  } else {
    v = std::ldexp(1.0 + std::ldexp(static_cast<double>(man), -man_bits),
                   static_cast<int>(exp) - bias);
  }
  return neg ? -v : v;
}

inline double decode_bf16(std::uint16_t h) { return decode(h, 8, 7); }
inline double decode_f16(std::uint16_t h) { return decode(h, 5, 10); }

// Round |x| (finite, as double) to the 15-bit magnitude patterns of a 16-bit format by
// picking the nearer of the two neighbours; ties go to the even pattern. The magnitude
// 0x7C00 / 0x7F80 (all-ones exponent) is Inf.
inline std::uint16_t round_magnitude(double ax, double (*dec)(std::uint16_t),
                                     std::uint16_t inf_bits) {
  // Binary search for the largest pattern p <= inf_bits with dec(p) <= ax.
  std::uint16_t lo = 0, hi = inf_bits;
  if (ax >= dec(inf_bits)) return inf_bits;
  while (hi - lo > 1) {
    const std::uint16_t mid = static_cast<std::uint16_t>((lo + hi) / 2);
    if (dec(mid) <= ax)
      lo = mid;
    else
      hi = mid;
  }
  const double dlo = ax - dec(lo);
  const double dhi = dec(hi) - ax;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1u) == 0 ? lo : hi;
}

// Expected f32 -> bf16 under the library's documented rules.
inline std::uint16_t ref_to_bf16(float f) {
  const std::uint32_t u = bits_of(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  if (std::isinf(f)) return static_cast<std::uint16_t>(sign | 0x7F80u);
  return static_cast<std::uint16_t>(
      sign | round_magnitude(std::fabs(static_cast<double>(f)), decode_bf16, 0x7F80u));
}

// Expected f32 -> f16.
inline std::uint16_t ref_to_f16(float f) {
  const std::uint32_t u = bits_of(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  if (std::isnan(f)) return static_cast<std::uint16_t>(sign | 0x7E00u | ((u >> 13) & 0x3FFu));
  if (std::isinf(f)) return static_cast<std::uint16_t>(sign | 0x7C00u);
  return static_cast<std::uint16_t>(
      sign | round_magnitude(std::fabs(static_cast<double>(f)), decode_f16, 0x7C00u));
}

// Expected widenings, as f32 bit patterns.
inline std::uint32_t ref_bf16_to_f32_bits(std::uint16_t h) { return std::uint32_t{h} << 16; }
inline std::uint32_t ref_f16_to_f32_bits(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  if ((h & 0x7C00u) == 0x7C00u) return sign | 0x7F800000u | (std::uint32_t{h & 0x3FFu} << 13);
  return bits_of(static_cast<float>(decode_f16(h)));  // exact: every f16 is an f32
}

// The f32 inputs that decide every rounding: each 16-bit value widened, and for each pair of
// neighbours the midpoint and the f32 values one ulp either side of it; plus random patterns.
inline std::vector<float> rounding_probe_inputs(bool f16, std::size_t random_count) {
  std::vector<float> out;
  auto dec = f16 ? decode_f16 : decode_bf16;
  const std::uint16_t inf_bits = f16 ? 0x7C00 : 0x7F80;
  for (std::uint32_t h = 0; h < inf_bits; ++h) {
    for (const double sign : {1.0, -1.0}) {
      const double v = dec(static_cast<std::uint16_t>(h));
      const double mid = (v + dec(static_cast<std::uint16_t>(h + 1))) / 2;
      const float m = static_cast<float>(sign * mid);  // exact: the midpoint has < 24 bits
      out.push_back(static_cast<float>(sign * v));
      out.push_back(m);
      out.push_back(std::nextafter(m, 0.0f));
      out.push_back(
          std::nextafter(m, std::numeric_limits<float>::infinity() * static_cast<float>(sign)));
    }
  }
  std::mt19937_64 rng(12345);
  for (std::size_t i = 0; i < random_count; ++i)
    out.push_back(float_of(static_cast<std::uint32_t>(rng())));
  for (float s : {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), 65504.0f, 65519.99f, 65520.0f,
                  std::numeric_limits<float>::quiet_NaN(), float_of(0x7F800001u),
                  float_of(0xFFFFFFFFu), float_of(0x7FBFFFFFu)}) {
    out.push_back(s);
  }
  return out;
}

// Runs fn(target_name) once with each Highway target this CPU supports forced on.
inline void for_each_simd_target(const std::function<void(const std::string&)>& fn) {
  for (const std::int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    fn(hwy::TargetName(target));
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Bitwise float equality, treating any two NaNs as equal.
inline bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b);
}

}  // namespace edgefuse_test
