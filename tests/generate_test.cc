// The counter-based generator of `edgefuse simulate` (src/kernels/generate.h): golden values
// computed independently in Python, and the SIMD kernel equal to the scalar definition on
// every Highway target, across the 2^32 counter boundary.
#include "src/kernels/generate.h"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "reference.h"

using edgefuse::detail::generate_uniform;
using edgefuse::detail::uniform_at;

TEST_CASE("uniform_at matches values computed independently (Python, exact integers)") {
  CHECK(edgefuse::detail::lowbias32(1) == 0x688990c0u);
  CHECK(uniform_at(0, 0, 1.0f) == -0.8413175344467163f);
  CHECK(uniform_at(1, 0, 1.0f) == -0.4493284225463867f);
  CHECK(uniform_at(12345, 7, 1.0f) == 0.4095940589904785f);
  CHECK(uniform_at(0xdeadbeefcafeULL, (1ULL << 32) + 5, 1.0f) == 0.20521771907806396f);
  CHECK(uniform_at(7, (1ULL << 32) - 1, 1.0f) == -0.2861822843551636f);
  CHECK(uniform_at(7, (1ULL << 32) - 1, 0.25f) == -0.2861822843551636f * 0.25f);
}

TEST_CASE("generate_uniform equals uniform_at on every SIMD target, any start and length") {
  edgefuse_test::for_each_simd_target([](const std::string&) {
    for (const std::uint64_t start : {0ULL, 3ULL, (1ULL << 32) - 37, 123456789012ULL}) {
      for (const std::size_t n : {0, 1, 15, 16, 17, 100, 1000}) {
        std::vector<float> got(n + 1, 42.0f);
        generate_uniform(got.data(), n, 99, start, 0.02f);
        bool same = true;
        for (std::size_t i = 0; i < n; ++i)
          same = same && got[i] == uniform_at(99, start + i, 0.02f);
        CAPTURE(start);
        CAPTURE(n);
        CHECK(same);
        CHECK(got[n] == 42.0f);  // nothing written past n
      }
    }
  });
  // Mean and spread of a large stream: uniform on [-1, 1).
  std::vector<float> v(1 << 20);
  generate_uniform(v.data(), v.size(), 5, 0, 1.0f);
  double sum = 0, sq = 0, lo = 1, hi = -1;
  for (float x : v) {
    sum += x;
    sq += double{x} * x;
    lo = std::min<double>(lo, x);
    hi = std::max<double>(hi, x);
  }
  CHECK(std::abs(sum / v.size()) < 0.005);
  CHECK(std::abs(sq / v.size() - 1.0 / 3.0) < 0.005);
  CHECK(lo >= -1.0);
  CHECK(hi < 1.0);
}
