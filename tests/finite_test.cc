// Tests for the non-finite scans of src/kernels/nonfinite.h (SIMD kernels in
// src/kernels/nonfinite.cc) on every SIMD target this machine supports: every position of a
// hit in arrays around the vector and block sizes, misaligned starts, the lowest of several
// hits, the largest finite patterns (never hits), and the parallel path at 1, 2 and 3 threads.
// Also the private fill_f32 kernel (src/kernels/tile.h) the aggregator clears its tiles with.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "reference.h"
#include "src/kernels/nonfinite.h"
#include "src/kernels/tile.h"

using namespace edgefuse;

namespace {

// Independent reference: the first pattern whose exponent bits are all set.
template <typename T>
std::size_t ref_first(const std::vector<T>& v, std::size_t from, T exp) {
  for (std::size_t i = from; i < v.size(); ++i) {
    if ((v[i] & exp) == exp) return i - from;
  }
  return detail::kNoIndex;
}

// Finite patterns with the most exponent bits short of all of them, both signs, and zero.
template <typename T>
std::vector<T> finite_fill(std::size_t n, T exp) {
  const T top = static_cast<T>(exp - (exp & (~exp + 1)));  // exponent field minus its low bit
  const T sign = static_cast<T>(T{1} << (8 * sizeof(T) - 1));
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const T mant = static_cast<T>(~(exp | sign));  // every mantissa bit
    switch (i % 4) {
      case 0:
        v[i] = static_cast<T>(top | mant);
        break;  // largest finite
      case 1:
        v[i] = static_cast<T>(sign | top | mant);
        break;  // its negative
      case 2:
        v[i] = static_cast<T>(sign | mant);
        break;  // negative subnormal
      default:
        v[i] = 0;
        break;
    }
  }
  return v;
}

template <typename T>
void check_positions(T exp, const std::string& what) {
  CAPTURE(what);
  const T nan = static_cast<T>(exp | 1), inf = exp,
          neg_inf = static_cast<T>(exp | (T{1} << (8 * sizeof(T) - 1)));
  for (std::size_t n : {0, 1, 2, 7, 16, 31, 33, 64, 127, 4095, 4096, 4097, 3 * 4096 + 5}) {
    for (std::size_t off : {0, 1, 3}) {
      std::vector<T> v = finite_fill<T>(n + off, exp);
      CAPTURE(n);
      CAPTURE(off);
      REQUIRE(detail::first_nonfinite_bits(v.data() + off, n, exp) == detail::kNoIndex);
      std::vector<std::size_t> at = {0, n / 2, n - 1, 15, 16, 4095, 4096, 4100};
      for (std::size_t pos : at) {
        if (pos >= n) continue;
        for (T bad : {nan, inf, neg_inf}) {
          std::vector<T> w = v;
          w[off + pos] = bad;
          if (pos + 5 < n) w[off + pos + 5] = nan;  // a later hit never wins
          const std::size_t got = detail::first_nonfinite_bits(w.data() + off, n, exp);
          REQUIRE(got == ref_first(w, off, exp));
          REQUIRE(got == pos);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("the non-finite scan finds the first NaN or Inf on every target") {
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    check_positions<std::uint16_t>(0x7F80u, "bf16");
    check_positions<std::uint16_t>(0x7C00u, "f16");
    check_positions<std::uint32_t>(0x7F800000u, "f32");
  });
}

TEST_CASE("a long non-finite scan gives the lowest hit at any thread count") {
  const std::size_t n = (std::size_t{1} << 22) + 77;  // past the parallel chunk size
  std::vector<std::uint16_t> v = finite_fill<std::uint16_t>(n, 0x7F80u);
  const std::size_t first = (std::size_t{3} << 20) + 9, later = (std::size_t{1} << 22) + 1;
  v[later] = 0x7F80u;
  const std::size_t before = num_threads();
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    for (std::size_t t : {1, 2, 3}) {
      CAPTURE(t);
      set_num_threads(t);
      REQUIRE(detail::first_nonfinite_bits(v.data(), n, std::uint16_t{0x7F80u}) == later);
      v[first] = 0xFFC1u;  // a negative NaN in an earlier chunk wins
      REQUIRE(detail::first_nonfinite_bits(v.data(), n, std::uint16_t{0x7F80u}) == first);
      v[first] = 0;
    }
  });
  set_num_threads(before);
  // Through the tensor entry: a bf16 view, an f32 view, and a dtype that is never scanned.
  std::vector<float> f(100, 1.0f);
  f[63] = -std::numeric_limits<float>::infinity();
  REQUIRE(detail::first_nonfinite(ConstTensorView(f.data(), DType::kF32, Shape{100})) == 63);
  REQUIRE(detail::first_nonfinite(ConstTensorView(v.data(), DType::kBF16, Shape{n})) == later);
  std::vector<std::int32_t> ints(4, 0x7F800000);
  REQUIRE(detail::first_nonfinite(ConstTensorView(ints.data(), DType::kI32, Shape{4})) ==
          detail::kNoIndex);
}

TEST_CASE("fill_f32 writes the value bit for bit, and nothing around it, on every SIMD target") {
  // Lengths around the vector widths (4, 8, 16 lanes and 4 vectors of each), misaligned
  // starts, and -0.0f, whose bits a memset cannot give.
  const std::uint32_t guard_bits = 0x7FC00123u, minus_zero = 0x80000000u;
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    for (std::size_t offset = 0; offset < 3; ++offset) {
      for (std::size_t n = 0; n <= 70; ++n) {
        std::vector<std::uint32_t> buf(n + 8, guard_bits);
        float* p = reinterpret_cast<float*>(buf.data()) + offset + 1;
        detail::fill_f32(p, n, -0.0f);
        for (std::size_t i = 0; i < buf.size(); ++i) {
          const bool inside = i >= offset + 1 && i < offset + 1 + n;
          REQUIRE(buf[i] == (inside ? minus_zero : guard_bits));
        }
      }
    }
  });
}
