// edgefuse/core/dtype.h — element types and exact f32 <-> bf16 / f16 conversions.
//
// DType lists every dtype of the safetensors format (huggingface/safetensors, enum `Dtype`),
// so that any tensor of a checkpoint can be named, sized and passed through. Three of them are
// computed on: F32, BF16 (bfloat16, the top 16 bits of an IEEE binary32) and F16 (IEEE
// binary16). Narrowing conversions round to nearest, ties to even (IEEE 754 default rounding),
// map overflow to +-Inf, keep subnormals, and keep NaN a NaN: the sign and the top payload bits
// survive and the quiet bit is set. Widening conversions are exact. The SIMD kernels use the
// same rules, so scalar and vector paths agree bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace edgefuse {

// Storage types for the two 16-bit float formats: a bit pattern, no arithmetic.
struct BFloat16 {
  std::uint16_t bits;
};
struct Float16 {
  std::uint16_t bits;
};
static_assert(sizeof(BFloat16) == 2 && sizeof(Float16) == 2, "16-bit storage types");

// Every safetensors dtype, in the reference implementation's order (increasing alignment).
enum class DType : std::uint8_t {
  kBool,
  kF4,
  kF6E2M3,
  kF6E3M2,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kF8E4M3Fnuz,
  kF8E5M2Fnuz,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};
inline constexpr int kNumDTypes = 22;

// The safetensors name of a dtype ("F32", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType dtype) noexcept;

// The dtype whose safetensors name is `name` (case-sensitive, as the format is), or nullopt.
std::optional<DType> dtype_from_name(std::string_view name) noexcept;

// Bits per element: 4 for F4, 6 for F6_*, 8 .. 64 for the rest.
int dtype_bits(DType dtype) noexcept;

// True for F32, BF16 and F16, the dtypes the kernels read and write.
constexpr bool is_compute_dtype(DType dtype) noexcept {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

// Bytes taken by `count` elements of `dtype`. Throws Error if count * bits overflows 64 bits
// or is not a whole number of bytes (odd counts of F4, for example).
std::uint64_t dtype_bytes(DType dtype, std::uint64_t count);

// The DType of a C++ element type: dtype_of<float> == DType::kF32, and so on.
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<BFloat16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<Float16> {
  static constexpr DType value = DType::kF16;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<std::int64_t> {
  static constexpr DType value = DType::kI64;
};
template <>
struct DTypeOf<std::int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<std::uint8_t> {
  static constexpr DType value = DType::kU8;
};
template <typename T>
inline constexpr DType dtype_of = DTypeOf<T>::value;

// ------------------------------------------------------------------ scalar conversions

inline std::uint32_t f32_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float f32_from_bits(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Exact: bf16 is the top half of an f32.
inline float to_f32(BFloat16 h) noexcept { return f32_from_bits(std::uint32_t{h.bits} << 16); }

// Round to nearest even. Adding 0x7FFF plus the lowest kept bit to the dropped half carries
// into the kept half exactly when the dropped half is above the midpoint, or at it with an
// odd kept half. NaN: keep sign and top payload, force the quiet bit (a carry could turn a
// NaN into Inf).
inline BFloat16 to_bf16(float f) noexcept {
  const std::uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return BFloat16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  }
  const std::uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return BFloat16{static_cast<std::uint16_t>(rounded >> 16)};
}

// Exact. Normals rebias the exponent by 112; subnormals (exponent field 0) are
// mantissa * 2^-24, formed exactly as a float difference; Inf/NaN keep their payload.
inline float to_f32(Float16 h) noexcept {
  const std::uint32_t sign = std::uint32_t{h.bits & 0x8000u} << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1Fu;
  const std::uint32_t mant = h.bits & 0x3FFu;
  std::uint32_t out;
  if (exp == 0x1Fu) {
    out = 0x7F800000u | (mant << 13);
  } else if (exp == 0) {
    // (2^-14 * (1 + mant/1024)) - 2^-14 == mant * 2^-24, exact in f32.
    const float v = f32_from_bits((113u << 23) | (mant << 13)) - f32_from_bits(113u << 23);
    out = f32_bits(v);
  } else {
    out = ((exp + 112u) << 23) | (mant << 13);
  }
  return f32_from_bits(out | sign);
}

// Round to nearest even, overflow to Inf (|f| >= 65520 rounds up past 65504), f16
// subnormals kept, f32 values below half the smallest subnormal flush to signed zero.
inline Float16 to_f16(float f) noexcept {
  std::uint32_t u = f32_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  std::uint32_t out;
  if (u >= (143u << 23)) {  // |f| >= 65536 (or Inf/NaN): past the largest finite f16 binade
    out = u > 0x7F800000u ? (0x7E00u | ((u >> 13) & 0x3FFu)) : 0x7C00u;
  } else if (u < (113u << 23)) {  // |f| < 2^-14: f16 subnormal or zero
    // Adding 0.5 (exponent 126) aligns the f16 subnormal grid (2^-24) with the last f32
    // mantissa bit, so the float addition itself rounds to nearest even.
    const float sum = f32_from_bits(u) + f32_from_bits(126u << 23);
    out = f32_bits(sum) - (126u << 23);
  } else {
    const std::uint32_t odd = (u >> 13) & 1u;
    out = (u - (112u << 23) + 0xFFFu + odd) >> 13;  // may carry into Inf: correct overflow
  }
  return Float16{static_cast<std::uint16_t>(out | sign)};
}

inline float to_f32(float f) noexcept { return f; }

}  // namespace edgefuse
