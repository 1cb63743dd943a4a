// Tests for edgefuse/kernels/convert.h on every SIMD target this machine supports: all 65,536
// patterns widened, every rounding decision narrowed, misaligned starts, bad arguments.
#include "edgefuse/kernels/convert.h"

#include <doctest/doctest.h>

#include <vector>

#include "edgefuse/core/error.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::bits_of;

TEST_CASE("bulk widening matches the reference for all 65536 patterns on every target") {
  std::vector<BFloat16> b(65536 + 3);
  std::vector<Float16> h(65536 + 3);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    b[i + 3].bits = static_cast<std::uint16_t>(i);
    h[i + 3].bits = static_cast<std::uint16_t>(i);
  }
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    for (std::size_t offset : {0, 1, 3}) {  // misaligned starts
      std::vector<float> out(65536 + 3, -1.0f);
      convert(b.data() + offset, out.data(), 65536 + 3 - offset);
      for (std::size_t i = 0; i + offset < 65536 + 3; ++i) {
        REQUIRE(bits_of(out[i]) == edgefuse_test::ref_bf16_to_f32_bits(b[i + offset].bits));
      }
      convert(h.data() + offset, out.data(), 65536 + 3 - offset);
      for (std::size_t i = 0; i + offset < 65536 + 3; ++i) {
        REQUIRE(bits_of(out[i]) == edgefuse_test::ref_f16_to_f32_bits(h[i + offset].bits));
      }
    }
  });
}

TEST_CASE("bulk narrowing rounds to nearest even like the reference on every target") {
  const std::vector<float> bf_in = edgefuse_test::rounding_probe_inputs(false, 1 << 18);
  const std::vector<float> h_in = edgefuse_test::rounding_probe_inputs(true, 1 << 18);
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    std::vector<BFloat16> b(bf_in.size());
    convert(bf_in.data() + 1, b.data(), bf_in.size() - 1);
    for (std::size_t i = 0; i + 1 < bf_in.size(); ++i) {
      REQUIRE_MESSAGE(b[i].bits == edgefuse_test::ref_to_bf16(bf_in[i + 1]), "input bits ",
                      bits_of(bf_in[i + 1]));
    }
    std::vector<Float16> h(h_in.size());
    convert(h_in.data(), h.data(), h_in.size());
    for (std::size_t i = 0; i < h_in.size(); ++i) {
      REQUIRE_MESSAGE(h[i].bits == edgefuse_test::ref_to_f16(h_in[i]), "input bits ",
                      bits_of(h_in[i]));
    }
  });
}

TEST_CASE("convert handles sizes 0, 1, N-1, N, N+1 and 3N+5 and writes nothing past n") {
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    for (std::size_t n : {0, 1, 15, 16, 17, 31, 32, 33, 53, 100}) {
      std::vector<float> src(n + 1);
      for (std::size_t i = 0; i < src.size(); ++i) src[i] = 1.0f + static_cast<float>(i) / 3.0f;
      std::vector<BFloat16> dst(n + 1, BFloat16{0xABCD});
      convert(src.data(), dst.data(), n);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE(dst[i].bits == edgefuse_test::ref_to_bf16(src[i]));
      CHECK(dst[n].bits == 0xABCD);
    }
  });
}

TEST_CASE("convert rejects null pointers and overlapping ranges") {
  std::vector<float> f(8, 1.0f);
  CHECK_THROWS_WITH_AS(convert(f.data(), static_cast<BFloat16*>(nullptr), 8),
                       "convert: dst is null but 8 elements were given", Error);
  CHECK_NOTHROW(convert(static_cast<const float*>(nullptr), static_cast<BFloat16*>(nullptr), 0));
  auto* alias = reinterpret_cast<BFloat16*>(f.data() + 2);
  CHECK_THROWS_AS(convert(f.data(), alias, 8), Error);
  CHECK(f[2] == 1.0f);  // nothing written
}
