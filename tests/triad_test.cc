// Tests for edgefuse/kernels/triad.h and edgefuse/kernels/target.h.
#include "edgefuse/kernels/triad.h"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/kernels/target.h"
#include "reference.h"

using namespace edgefuse;

TEST_CASE("triad computes b + s * c on every target, and the target name follows dispatch") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    CHECK(std::string(simd_target_name()) == target);
    for (std::size_t n : {0, 1, 15, 16, 17, 53, 70001}) {
      std::vector<float> a(n + 1, -1.0f), b(n), c(n);
      for (std::size_t i = 0; i < n; ++i) {
        b[i] = static_cast<float>(i);
        c[i] = 0.5f * static_cast<float>(i % 7);
      }
      triad(a.data(), b.data(), c.data(), 3.0f, n);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(a[i] == b[i] + 3.0f * c[i]);
      CHECK(a[n] == -1.0f);
    }
  });
}

TEST_CASE("measure_triad_bytes_per_second gives a positive rate and rejects empty runs") {
  CHECK(measure_triad_bytes_per_second(1 << 16, 2) > 1e8);  // > 0.1 GB/s on any machine
  CHECK_THROWS_WITH_AS(
      measure_triad_bytes_per_second(0, 3),
      "measure_triad_bytes_per_second: need n > 0 and reps > 0, got n = 0, reps = 3", Error);
}
