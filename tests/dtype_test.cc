// Tests for edgefuse/core/dtype.h: names and sizes of every safetensors dtype, and the scalar
// f32 <-> bf16 / f16 conversions over all 65,536 patterns of each 16-bit type.
#include "edgefuse/core/dtype.h"

#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "edgefuse/core/error.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::bits_of;

TEST_CASE("every safetensors dtype name round-trips and has its bit width") {
  struct Row {
    const char* name;
    int bits;
  };
  const Row rows[] = {{"BOOL", 8},    {"F4", 4},          {"F6_E2M3", 6},     {"F6_E3M2", 6},
                      {"U8", 8},      {"I8", 8},          {"F8_E5M2", 8},     {"F8_E4M3", 8},
                      {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"I16", 16},
                      {"U16", 16},    {"F16", 16},        {"BF16", 16},       {"I32", 32},
                      {"U32", 32},    {"F32", 32},        {"C64", 64},        {"F64", 64},
                      {"I64", 64},    {"U64", 64}};
  CHECK(sizeof(rows) / sizeof(rows[0]) == static_cast<std::size_t>(kNumDTypes));
  for (const Row& r : rows) {
    const auto d = dtype_from_name(r.name);
    REQUIRE(d.has_value());
    CHECK(dtype_name(*d) == r.name);
    CHECK(dtype_bits(*d) == r.bits);
  }
  CHECK_FALSE(dtype_from_name("f32").has_value());
  CHECK_FALSE(dtype_from_name("F128").has_value());
  CHECK_FALSE(dtype_from_name("").has_value());
  CHECK(is_compute_dtype(DType::kBF16));
  CHECK_FALSE(is_compute_dtype(DType::kF64));
  CHECK(dtype_of<float> == DType::kF32);
  CHECK(dtype_of<BFloat16> == DType::kBF16);
  CHECK(dtype_of<Float16> == DType::kF16);
}

TEST_CASE("dtype_bytes counts sub-byte types and rejects partial bytes and overflow") {
  CHECK(dtype_bytes(DType::kBF16, 10) == 20);
  CHECK(dtype_bytes(DType::kF4, 6) == 3);
  CHECK(dtype_bytes(DType::kF6E2M3, 4) == 3);
  CHECK(dtype_bytes(DType::kF32, 0) == 0);
  CHECK_THROWS_WITH_AS(dtype_bytes(DType::kF4, 3),
                       "dtype_bytes: 3 elements of F4 take 12 bits, not a whole number of bytes",
                       Error);
  CHECK_THROWS_WITH_AS(dtype_bytes(DType::kF64, std::uint64_t{1} << 58),
                       "dtype_bytes: 288230376151711744 elements of F64 overflow 64 bits of size",
                       Error);
}

TEST_CASE("bf16 widening is exact for all 65536 patterns") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = to_f32(BFloat16{static_cast<std::uint16_t>(h)});
    REQUIRE(bits_of(f) == edgefuse_test::ref_bf16_to_f32_bits(static_cast<std::uint16_t>(h)));
  }
}

TEST_CASE("f16 widening is exact for all 65536 patterns, NaN payloads kept") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto hh = static_cast<std::uint16_t>(h);
    const float f = to_f32(Float16{hh});
    REQUIRE(bits_of(f) == edgefuse_test::ref_f16_to_f32_bits(hh));
    if ((h & 0x7C00u) != 0x7C00u) {
      REQUIRE(static_cast<double>(f) == edgefuse_test::decode_f16(hh));
    }
  }
  CHECK(to_f32(Float16{0x0001}) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(to_f32(Float16{0x7BFF}) == 65504.0f);
  CHECK(std::isinf(to_f32(Float16{0xFC00})));
}

TEST_CASE("bf16 and f16 patterns survive a round trip through f32") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto hh = static_cast<std::uint16_t>(h);
    const std::uint16_t bq = (hh & 0x7FFFu) > 0x7F80u ? static_cast<std::uint16_t>(hh | 0x40u) : hh;
    REQUIRE(to_bf16(to_f32(BFloat16{hh})).bits == bq);  // a signalling NaN comes back quiet
    const std::uint16_t hq =
        (hh & 0x7FFFu) > 0x7C00u ? static_cast<std::uint16_t>(hh | 0x200u) : hh;
    REQUIRE(to_f16(to_f32(Float16{hh})).bits == hq);
  }
}

TEST_CASE("f32 to bf16 rounds to nearest even at every midpoint") {
  for (const float f : edgefuse_test::rounding_probe_inputs(false, 1 << 20)) {
    REQUIRE_MESSAGE(to_bf16(f).bits == edgefuse_test::ref_to_bf16(f), "input bits ", bits_of(f));
  }
  CHECK(to_bf16(1.00390625f).bits == 0x3F80);  // 1 + 2^-8: tie, kept even (down)
  CHECK(to_bf16(1.01171875f).bits == 0x3F82);  // 1 + 3*2^-8: tie, rounded to even (up)
  CHECK(to_bf16(3.4e38f).bits == 0x7F80);      // above bf16 max + half ulp: Inf
}

TEST_CASE("f32 to f16 rounds to nearest even, overflows to Inf and keeps subnormals") {
  for (const float f : edgefuse_test::rounding_probe_inputs(true, 1 << 20)) {
    REQUIRE_MESSAGE(to_f16(f).bits == edgefuse_test::ref_to_f16(f), "input bits ", bits_of(f));
  }
  CHECK(to_f16(65504.0f).bits == 0x7BFF);
  CHECK(to_f16(65519.0f).bits == 0x7BFF);
  CHECK(to_f16(65520.0f).bits == 0x7C00);               // the tie above max goes to Inf (even)
  CHECK(to_f16(std::ldexp(1.0f, -25)).bits == 0x0000);  // half the smallest subnormal: tie to 0
  CHECK(to_f16(std::ldexp(1.5f, -25)).bits == 0x0001);
  CHECK(to_f16(-0.0f).bits == 0x8000);
  CHECK(to_f16(std::nanf("")).bits == 0x7E00);
}
