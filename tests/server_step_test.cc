// Tests for edgefuse/kernels/server_step.h on every SIMD target: each rule's formula on exact
// golden values, every rule, mode and dtype against an independent scalar f32 recomputation
// (bitwise) and Adam against double, uncovered elements and their state kept bit for bit, and
// argument errors.
#include "edgefuse/kernels/server_step.h"

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "reference.h"
#include "typed_reference.h"

using namespace edgefuse;
using edgefuse_test::narrow;
using edgefuse_test::raw;
using edgefuse_test::widen;

namespace {

constexpr ServerRule kRules[] = {ServerRule::kFedAvgM, ServerRule::kFedAdam, ServerRule::kFedYogi,
                                 ServerRule::kFedAdagrad, ServerRule::kNesterov};

bool two_states(ServerRule r) { return r != ServerRule::kFedAvgM && r != ServerRule::kNesterov; }

// The header's formulas, one element at a time, in f32.
template <typename T>
void reference(const ServerStep& p, const std::vector<T>& base, const std::vector<float>& acc,
               const std::vector<float>& wsum, std::vector<float>& m, std::vector<float>& v,
               std::vector<T>& out) {
  const float c1 = 1.0f - p.beta1, c2 = 1.0f - p.beta2;
  for (std::size_t i = 0; i < base.size(); ++i) {
    out[i] = base[i];
    if (!(wsum[i] > 0.0f)) continue;
    const float w = widen(base[i]);
    const float q = acc[i] / wsum[i];
    const float d = p.delta ? q : q - w;
    float s = 0.0f;
    switch (p.rule) {
      case ServerRule::kFedAvgM:
        m[i] = p.momentum * m[i] + d;
        s = p.lr * m[i];
        break;
      case ServerRule::kNesterov: {
        const float g = -d;
        m[i] = p.momentum * m[i] + g;
        s = -(p.lr * (g + p.momentum * m[i]));
        break;
      }
      default: {
        m[i] = p.beta1 * m[i] + c1 * d;
        const float d2 = d * d;
        if (p.rule == ServerRule::kFedAdam) v[i] = p.beta2 * v[i] + c2 * d2;
        if (p.rule == ServerRule::kFedAdagrad) v[i] = v[i] + d2;
        if (p.rule == ServerRule::kFedYogi) {
          const float diff = v[i] - d2;
          v[i] = v[i] - (c2 * d2) * (diff > 0 ? 1.0f : diff < 0 ? -1.0f : 0.0f);
        }
        s = p.lr * (m[i] / (std::sqrt(v[i]) + p.tau));
      }
    }
    out[i] = s == 0.0f ? base[i] : narrow<T>(w + s);
  }
}

template <typename T>
void check_against_reference(const std::string& target) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::size_t n = 1003;  // full vectors and a tail on every target
  std::vector<T> base(n);
  std::vector<float> acc(n), wsum(n), m0(n), v0(n);
  for (std::size_t i = 0; i < n; ++i) {
    base[i] = narrow<T>(normal(rng));
    wsum[i] = i % 5 == 0 ? 0.0f : i % 7 == 0 ? -1.0f : 1.0f + static_cast<float>(i % 3);
    acc[i] = wsum[i] * normal(rng) * 0.1f;
    m0[i] = normal(rng) * 0.01f;
    v0[i] = std::fabs(normal(rng)) * 0.01f;
  }
  for (const ServerRule rule : kRules) {
    for (const bool delta : {true, false}) {
      CAPTURE(target);
      CAPTURE(static_cast<int>(rule));
      CAPTURE(delta);
      ServerStep p;
      p.rule = rule;
      p.delta = delta;
      p.lr = rule == ServerRule::kNesterov ? 0.7f : 0.05f;
      std::vector<float> m = m0, v = v0, rm = m0, rv = v0;
      std::vector<T> out(n), want(n);
      const std::size_t covered =
          server_step(out.data(), base.data(), acc.data(), wsum.data(), m.data(),
                      two_states(rule) ? v.data() : nullptr, n, p);
      reference(p, base, acc, wsum, rm, rv, want);
      std::size_t expect_covered = 0, same_out = 0, same_state = 0;
      for (std::size_t i = 0; i < n; ++i) {
        expect_covered += wsum[i] > 0.0f ? 1 : 0;
        same_out += raw(out[i]) == raw(want[i]) ? 1 : 0;
        same_state += edgefuse_test::bits_of(m[i]) == edgefuse_test::bits_of(rm[i]) &&
                              (!two_states(rule) ||
                               edgefuse_test::bits_of(v[i]) == edgefuse_test::bits_of(rv[i]))
                          ? 1
                          : 0;
      }
      CHECK(covered == expect_covered);
      CHECK(same_out == n);
      CHECK(same_state == n);
      // In place gives the same bits.
      std::vector<T> in_place = base;
      std::vector<float> m2 = m0, v2 = v0;
      server_step(in_place.data(), in_place.data(), acc.data(), wsum.data(), m2.data(),
                  two_states(rule) ? v2.data() : nullptr, n, p);
      std::size_t same_in_place = 0;
      for (std::size_t i = 0; i < n; ++i) same_in_place += raw(in_place[i]) == raw(out[i]) ? 1 : 0;
      CHECK(same_in_place == n);
    }
  }
}

}  // namespace

TEST_CASE("server_step: each rule on values exact in binary") {
  // One covered element with W = 3, in delta mode d = acc / wsum = 2 / 1.
  auto one = [](ServerStep p, float m, float v) {
    float w = 3.0f, acc = 2.0f, wsum = 1.0f;
    server_step(&w, &w, &acc, &wsum, &m, &v, 1, p);
    return std::vector<float>{w, m, v};
  };
  ServerStep p;
  p.rule = ServerRule::kFedAvgM;  // m = 0.5 * 2 + 2 = 3; W = 3 + 0.5 * 3
  p.momentum = 0.5f;
  p.lr = 0.5f;
  CHECK(one(p, 2.0f, 0.0f) == std::vector<float>{4.5f, 3.0f, 0.0f});
  p.rule = ServerRule::kNesterov;  // g = -2; m = 0.5 * 2 - 2 = -1; W = 3 - 0.5 * (-2 - 0.5)
  CHECK(one(p, 2.0f, 0.0f) == std::vector<float>{4.25f, -1.0f, 0.0f});
  p = ServerStep{};
  p.rule = ServerRule::kFedAdam;  // m = 0.5*0 + 0.5*2 = 1; v = 0.75*0 + 0.25*4 = 1
  p.beta1 = 0.5f;                 // W = 3 + 2 * 1 / (1 + 1)
  p.beta2 = 0.75f;
  p.tau = 1.0f;
  p.lr = 2.0f;
  CHECK(one(p, 0.0f, 0.0f) == std::vector<float>{4.0f, 1.0f, 1.0f});
  p.rule = ServerRule::kFedYogi;  // v = 18 - 0.5 * 4 * sign(18 - 4) = 16
  p.beta2 = 0.5f;                 // W = 3 + 8 * 1 / (4 + 4)
  p.tau = 4.0f;
  p.lr = 8.0f;
  CHECK(one(p, 0.0f, 18.0f) == std::vector<float>{4.0f, 1.0f, 16.0f});
  // v below d*d: sign -1, v grows: v = 1 + 0.5 * 4 = 3.
  CHECK(one(p, 0.0f, 1.0f)[2] == 3.0f);
  p.rule = ServerRule::kFedAdagrad;  // v = 12 + 4 = 16; W = 3 + 8 * 1 / (4 + 4)
  CHECK(one(p, 0.0f, 12.0f) == std::vector<float>{4.0f, 1.0f, 16.0f});
  // Params mode: d = acc / wsum - W = 5 - 3 = 2, the same step.
  p.delta = false;
  float w = 3.0f, acc = 10.0f, wsum = 2.0f, m = 0.0f, v = 12.0f;
  server_step(&w, &w, &acc, &wsum, &m, &v, 1, p);
  CHECK(w == 4.0f);
}

TEST_CASE("server_step: every rule, mode and dtype equals the scalar formula bit for bit") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    check_against_reference<float>(target);
    check_against_reference<BFloat16>(target);
    check_against_reference<Float16>(target);
  });
}

TEST_CASE("server_step: Adam over ten rounds stays within f32 rounding of a double recurrence") {
  ServerStep p;  // published defaults: lr 1, b1 0.9, b2 0.99, tau 1e-3
  const std::vector<float> d{0.3f, -0.1f, 0.25f, 0.0f, -0.4f, 0.05f, 0.2f, -0.3f, 0.1f, 0.15f};
  float w = 1.0f, m = 0.0f, v = 0.0f;
  double wd = 1.0, md = 0.0, vd = 0.0;
  for (const float di : d) {
    float wsum = 2.0f, acc = 2.0f * di;
    server_step(&w, &w, &acc, &wsum, &m, &v, 1, p);
    md = 0.9 * md + 0.1 * di;
    vd = 0.99 * vd + 0.01 * static_cast<double>(di) * di;
    wd += md / (std::sqrt(vd) + 1e-3);
  }
  CHECK(w == doctest::Approx(wd).epsilon(1e-5));
  CHECK(m == doctest::Approx(md).epsilon(1e-5));
  CHECK(v == doctest::Approx(vd).epsilon(1e-5));
}

TEST_CASE(
    "server_step: uncovered elements keep W and the state bit for bit, and a zero step keeps -0") {
  std::vector<BFloat16> w{BFloat16{0x8000}, BFloat16{0x7FC1}, BFloat16{0x3F80}};  // -0, NaN, 1
  std::vector<float> acc{0.0f, 5.0f, 1.0f}, wsum{1.0f, 0.0f, std::nanf("")};
  std::vector<float> m{0.0f, -0.0f, 7.0f}, v{0.0f, 3.0f, std::nanf("")};
  ServerStep p;
  p.rule = ServerRule::kFedAvgM;  // element 0: d = 0, m = 0, step 0: -0 stays -0
  server_step(w.data(), w.data(), acc.data(), wsum.data(), m.data(), v.data(), 3, p);
  CHECK(w[0].bits == 0x8000);
  CHECK(w[1].bits == 0x7FC1);
  CHECK(w[2].bits == 0x3F80);
  CHECK(edgefuse_test::bits_of(m[1]) == 0x80000000u);
  CHECK(m[2] == 7.0f);
  CHECK(v[1] == 3.0f);
}

TEST_CASE("server_step: parameters and arrays are checked before anything is written") {
  float w = 1.0f, acc = 1.0f, wsum = 1.0f, m = 0.0f, v = 0.0f;
  ServerStep p;
  p.lr = 0.0f;
  CHECK_THROWS_WITH_AS(server_step(&w, &w, &acc, &wsum, &m, &v, 1, p),
                       "server_step: lr = 0 must be finite and > 0", Error);
  p = ServerStep{};
  p.beta2 = 1.0f;
  CHECK_THROWS_WITH_AS(server_step(&w, &w, &acc, &wsum, &m, &v, 1, p),
                       "server_step: beta2 = 1 must be in [0, 1)", Error);
  p = ServerStep{};
  p.tau = -1.0f;
  CHECK_THROWS_WITH_AS(server_step(&w, &w, &acc, &wsum, &m, &v, 1, p),
                       "server_step: tau = -1 must be finite and > 0", Error);
  p = ServerStep{};
  CHECK_THROWS_WITH_AS(server_step(&w, &w, &acc, &wsum, &m, nullptr, 1, p),
                       "server_step: v is null but 1 elements were given", Error);
  CHECK_THROWS_AS(server_step(&w, &w, &acc, &wsum, &m, &m, 1, p), Error);  // m and v overlap
  CHECK(w == 1.0f);
  CHECK(m == 0.0f);
  p.rule = ServerRule::kNesterov;  // one state: v may be null
  server_step(&w, &w, &acc, &wsum, &m, nullptr, 1, p);
  CHECK(w != 1.0f);
}
