// Tests for kernels/lora_update.h and lora/{adapter,task_merge,combine,federated}.h: the merge
// kernel on every SIMD target against a scalar loop (bitwise) and a double reference (bf16
// within 1 ulp), every golden vector, round trips, lifting equivalence and the
// bad-input errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/lora_update.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"
#include "edgefuse/lora/federated.h"
#include "edgefuse/lora/task_merge.h"
#include "extract_helpers.h"
#include "reference.h"
#include "typed_reference.h"

using namespace edgefuse;
using edgefuse_test::bits_of;

namespace {

using Rows = std::vector<std::vector<double>>;

Tensor mat(const Rows& rows) {
  const std::uint64_t r = rows.size(), c = rows.empty() ? 0 : rows[0].size();
  Tensor t = Tensor::empty(DType::kF32, Shape{r, c});
  float* p = t.view().data_as<float>();
  for (std::uint64_t i = 0; i < r; ++i) {
    for (std::uint64_t j = 0; j < c; ++j) p[i * c + j] = static_cast<float>(rows[i][j]);
  }
  return t;
}

LoraModule module_of(const Rows& a, const Rows& b, double scaling = 1.0, std::string name = "m") {
  const Tensor ta = mat(a), tb = mat(b);
  return make_lora_module(std::move(name), ta.view(), tb.view(), scaling, "test");
}

LoraAdapter adapter_of(std::string label, LoraModule m) {
  LoraAdapter a;
  a.label = std::move(label);
  a.modules.push_back(std::move(m));
  return a;
}

// s·B·A of a module in double (B·A orientation).
Rows product(const LoraModule& m) {
  const auto out = m.out_features(), in = m.in_features(), r = m.rank();
  const float* a = m.a.view().data_as<float>();
  const float* b = m.b.view().data_as<float>();
  Rows p(out, std::vector<double>(in, 0.0));
  for (std::uint64_t i = 0; i < out; ++i) {
    for (std::uint64_t j = 0; j < in; ++j) {
      double s = 0;
      for (std::uint64_t k = 0; k < r; ++k) s += double{b[i * r + k]} * a[k * in + j];
      p[i][j] = m.scaling * s;
    }
  }
  return p;
}

void check_rows(const Rows& got, const Rows& want, double tol) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    REQUIRE(got[i].size() == want[i].size());
    for (std::size_t j = 0; j < got[i].size(); ++j) {
      CAPTURE(i);
      CAPTURE(j);
      CHECK(std::fabs(got[i][j] - want[i][j]) <= tol);
    }
  }
}

Rows rows_of(const Tensor& t) {
  const auto r = t.shape()[0], c = t.shape()[1];
  const float* p = t.view().data_as<float>();
  Rows out(r, std::vector<double>(c));
  for (std::uint64_t i = 0; i < r; ++i) {
    for (std::uint64_t j = 0; j < c; ++j) out[i][j] = p[i * c + j];
  }
  return out;
}

// The golden adapter factors.
const Rows kA1 = {{1, 0, 2, 0}}, kB1 = {{1}, {2}, {0}};
const Rows kA2 = {{0, 1, 0, 1}, {1, 0, 0, 0}}, kB2 = {{1, 0}, {0, 1}, {1, 1}};
const Rows kM = {{0.25, 0.75, 0.5, 0.75}, {1.25, 0, 1, 0}, {0.75, 0.75, 0, 0.75}};

// ------------------------------------------------------------------ the kernel

using edgefuse_test::narrow;
using edgefuse_test::raw;
using edgefuse_test::widen;

// The documented formula, one element at a time, in scalar f32.
template <typename T>
void scalar_update(std::vector<T>& w, std::size_t ldw, const std::vector<float>& l,
                   const std::vector<float>& rt, std::size_t rows, std::size_t cols,
                   std::size_t rank, float s) {
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < cols; ++j) {
      float acc = -0.0f;
      for (std::size_t k = 0; k < rank; ++k) acc = acc + l[i * rank + k] * rt[k * cols + j];
      const float d = acc * s;
      T& x = w[i * ldw + j];
      if (d != 0.0f) x = narrow<T>(widen(x) + d);
    }
  }
}

template <typename T>
void check_kernel_shapes(const std::string& target) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (std::size_t rows : {0, 1, 2, 3, 7}) {
    for (std::size_t cols : {0, 1, 5, 15, 16, 17, 64, 69, 133}) {
      for (std::size_t rank : {0, 1, 3, 8, 17}) {
        const std::size_t ldw = cols + 3;
        std::vector<T> w(rows * ldw + 1);
        for (auto& x : w) x = narrow<T>(u(rng) * 4.0f);
        std::vector<float> l(rows * rank), rt(rank * cols);
        for (auto& x : l) x = u(rng);
        for (auto& x : rt) x = u(rng);
        // Misaligned start: W begins one element into the buffer; element 0 stays untouched.
        std::vector<T> got = w;
        lora_update(got.data() + 1, ldw, l.data(), rt.data(), rows, cols, rank, 0.37f);
        std::vector<T> want = w;
        {
          std::vector<T> tmp(w.begin() + 1, w.end());
          scalar_update(tmp, ldw, l, rt, rows, cols, rank, 0.37f);
          std::copy(tmp.begin(), tmp.end(), want.begin() + 1);
        }
        bool same = true;
        for (std::size_t i = 0; i < w.size(); ++i) same = same && raw(got[i]) == raw(want[i]);
        CAPTURE(target);
        CAPTURE(rows);
        CAPTURE(cols);
        CAPTURE(rank);
        CHECK(same);
      }
    }
  }
}

}  // namespace

TEST_CASE("lora_update equals the scalar formula bit for bit on every SIMD target") {
  edgefuse_test::for_each_simd_target([](const std::string& target) {
    check_kernel_shapes<float>(target);
    check_kernel_shapes<BFloat16>(target);
    check_kernel_shapes<Float16>(target);
  });
}

TEST_CASE("lora_update into bf16 is within 1 ulp of a double-precision reference") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const std::size_t rows = 37, cols = 301, rank = 16;
  std::vector<BFloat16> w(rows * cols);
  for (auto& x : w) x = narrow<BFloat16>(u(rng));
  std::vector<float> l(rows * rank), rt(rank * cols);
  for (auto& x : l) x = u(rng) * 0.3f;
  for (auto& x : rt) x = u(rng) * 0.3f;
  const float s = 2.0f;
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    auto got = w;
    lora_update(got.data(), cols, l.data(), rt.data(), rows, cols, rank, s);
    std::size_t worst = 0;
    for (std::size_t i = 0; i < rows; ++i) {
      for (std::size_t j = 0; j < cols; ++j) {
        double acc = 0;
        for (std::size_t k = 0; k < rank; ++k) acc += double{l[i * rank + k]} * rt[k * cols + j];
        const double ref = edgefuse_test::decode_bf16(w[i * cols + j].bits) + s * acc;
        // ulp distance between got and the correctly rounded reference.
        const std::uint16_t want = edgefuse_test::ref_to_bf16(static_cast<float>(ref));
        const auto ord = [](std::uint16_t b) {
          return (b & 0x8000u) ? -static_cast<int>(b & 0x7FFFu) : static_cast<int>(b);
        };
        worst = std::max<std::size_t>(
            worst, static_cast<std::size_t>(std::abs(ord(got[i * cols + j].bits) - ord(want))));
      }
    }
    CAPTURE(target);
    CHECK(worst <= 1);
  });
}

TEST_CASE("lora_update with a zero adapter keeps every bit, -0 included") {
  std::vector<float> w = {-0.0f, 0.0f, 1.5f, -2.0f, 3.0f, -0.0f, 7.0f};
  const std::vector<float> l = {0.0f, -0.0f}, rt(2 * 7, 0.0f);
  auto got = w;
  lora_update(got.data(), 7, l.data(), rt.data(), 1, 7, 2, 1.0f);
  for (std::size_t i = 0; i < w.size(); ++i) CHECK(bits_of(got[i]) == bits_of(w[i]));
}

TEST_CASE("lora_update is identical for 1, 2 and 3 threads") {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const std::size_t rows = 301, cols = 517, rank = 8;
  std::vector<BFloat16> w(rows * cols);
  for (auto& x : w) x = narrow<BFloat16>(u(rng));
  std::vector<float> l(rows * rank), rt(rank * cols);
  for (auto& x : l) x = u(rng);
  for (auto& x : rt) x = u(rng);
  std::vector<std::vector<BFloat16>> results;
  const auto saved = num_threads();
  for (std::size_t t : {1, 2, 3}) {
    set_num_threads(t);
    auto got = w;
    lora_update(got.data(), cols, l.data(), rt.data(), rows, cols, rank, 0.5f);
    results.push_back(got);
  }
  set_num_threads(saved);
  for (const auto& r : results) {
    CHECK(std::memcmp(r.data(), results[0].data(), r.size() * sizeof(BFloat16)) == 0);
  }
}

TEST_CASE("lora_update rejects bad arguments") {
  std::vector<float> w(8), l(2), rt(8);
  CHECK_THROWS_WITH_AS(lora_update(w.data(), 3, l.data(), rt.data(), 2, 4, 1, 1.0f),
                       "lora_update: ldw = 3 is less than cols = 4", Error);
  CHECK_THROWS_WITH_AS(lora_update(w.data(), 4, l.data(), rt.data(), 2, 4, 1, NAN),
                       "lora_update: scale = nan is not finite", Error);
  CHECK_THROWS_AS(lora_update(w.data(), 4, w.data(), rt.data(), 2, 4, 1, 1.0f), Error);
}

// ------------------------------------------------------------------ merge / unmerge

TEST_CASE("merge and unmerge, fan_in_fan_out and embeddings") {
  const LoraModule m = module_of(kA1, kB1, 2.0);
  Tensor w = mat({{1, 0, 0, 0}, {0, 1, 0, 0}, {0, 0, 1, 0}});
  const Rows w0 = rows_of(w);
  merge_lora(w.view(), m);
  check_rows(rows_of(w), {{3, 0, 4, 0}, {4, 1, 8, 0}, {0, 0, 1, 0}}, 0.0);
  unmerge_lora(w.view(), m);
  check_rows(rows_of(w), w0, 0.0);  // exact in f32

  LoraModule t = module_of(kA1, kB1, 2.0);
  t.fan_in_fan_out = true;
  Tensor wt = mat({{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {0, 0, 0}});
  merge_lora(wt.view(), t);
  check_rows(rows_of(wt), {{3, 4, 0}, {0, 1, 0}, {4, 8, 1}, {0, 0, 0}}, 0.0);

  LoraModule e = module_of(kA1, kB1, 2.0);
  e.kind = LoraPair::Kind::kEmbedding;  // (num_embeddings, dim) = (4, 3)
  Tensor we = Tensor::zeros(DType::kF32, Shape{4, 3});
  merge_lora(we.view(), e);
  check_rows(rows_of(we), {{2, 4, 0}, {0, 0, 0}, {4, 8, 0}, {0, 0, 0}}, 0.0);

  Tensor wrong = Tensor::zeros(DType::kF32, Shape{4, 3});
  CHECK_THROWS_WITH_AS(merge_lora(wrong.view(), m),
                       "merge_lora: 'm' weight is [4, 3] but its adapter (A [1, 4], B [3, 1]) "
                       "needs [3, 4]",
                       Error);
}

TEST_CASE("DoRA merge and unmerge: the golden W0, dW and magnitude case") {
  // W0 = [[1, 0], [0, 2]], ΔW = B·A = [[0, 1], [0, 0]], m = [1.5, 2]: row norms of W0 + ΔW are
  // [√2, 2], so the rows scale by [1.5/√2, 1].
  const LoraModule m = module_of({{0, 1}}, {{1}, {0}});
  const std::vector<float> mag{1.5f, 2.0f};
  Tensor w = mat({{1, 0}, {0, 2}});
  const auto norms = merge_dora(w.view(), m, mag);
  REQUIRE(norms.size() == 2);
  CHECK(norms[0] == doctest::Approx(std::sqrt(2.0)));
  CHECK(norms[1] == 2.0);
  check_rows(rows_of(w), {{1.06066, 1.06066}, {0, 2}}, 1e-5);
  CHECK(rows_of(w)[0][0] == static_cast<float>(1.5 / std::sqrt(2.0)));  // one rounding
  unmerge_dora(w.view(), m, mag, norms);
  check_rows(rows_of(w), {{1, 0}, {0, 2}}, 1e-7);
  // fan_in_fan_out: the stored weight is the transpose, and so is the result.
  Tensor a = mat({{0, 1}}), b = mat({{1}, {0}});
  const LoraModule mt =
      make_lora_module("m", a.view(), b.view(), 1.0, "test", LoraPair::Kind::kLinear, true);
  Tensor wt = mat({{1, 0}, {0, 2}});  // (in, out) = W0ᵀ (W0 is symmetric here: [[1,0],[0,2]])
  merge_dora(wt.view(), mt, mag);
  check_rows(rows_of(wt), {{1.06066, 0}, {1.06066, 2}}, 1e-5);
  // Bad input.
  Tensor w2 = mat({{1, 0}, {0, 2}});
  CHECK_THROWS_WITH_AS(merge_dora(w2.view(), m, {1.0f}),
                       "merge_dora: 'm' has 1 magnitudes for 2 output features", Error);
  CHECK_THROWS_WITH_AS(merge_dora(w2.view(), m, {1.0f, NAN}),
                       "merge_dora: 'm' magnitude 1 = nan must be finite and >= 0", Error);
  Tensor zero = mat({{3, 0}, {0, 0}});  // row 1 of W + ΔW is 0: row 0 is not changed either
  CHECK_THROWS_WITH_AS(merge_dora(zero.view(), m, mag),
                       "merge_dora: 'm' row 1 of W + ΔW has norm 0", Error);
  check_rows(rows_of(zero), {{3, 0}, {0, 0}}, 0.0);
}

TEST_CASE("merge then unmerge of a bf16 weight stays within one rounding per step") {
  std::mt19937 rng(9);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Rows a(4, std::vector<double>(40)), b(24, std::vector<double>(4));
  for (auto& r : a)
    for (auto& x : r) x = u(rng) * 0.1;
  for (auto& r : b)
    for (auto& x : r) x = u(rng) * 0.1;
  const LoraModule m = module_of(a, b, 2.0);
  Tensor w = Tensor::empty(DType::kBF16, Shape{24, 40});
  auto* p = w.view().data_as<BFloat16>();
  for (std::size_t i = 0; i < 24 * 40; ++i) p[i] = narrow<BFloat16>(static_cast<float>(u(rng)));
  std::vector<BFloat16> before(p, p + 24 * 40);
  merge_lora(w.view(), m);
  unmerge_lora(w.view(), m);
  // Two roundings (merge, unmerge), each at most half an ulp of max(|w|, |w + d|): bf16's unit
  // roundoff is 2^-8. PEFT's unmerge does not restore bf16 bit for bit either.
  const Rows d = product(m);
  std::size_t bad = 0, changed = 0;
  for (std::size_t i = 0; i < before.size(); ++i) {
    const double w0 = edgefuse_test::decode_bf16(before[i].bits);
    const double w2 = edgefuse_test::decode_bf16(p[i].bits);
    const double bound = 0x1p-8 * (2 * std::fabs(w0) + std::fabs(d[i / 40][i % 40]));
    bad += std::fabs(w2 - w0) > bound;
    changed += p[i].bits != before[i].bits;
  }
  CHECK(bad == 0);
  CHECK(changed < before.size() / 2);
}

TEST_CASE("make_lora_module rejects ranks that disagree and non-finite factors") {
  CHECK_THROWS_WITH_AS(module_of(kA2, kB1),
                       "test: module 'm': lora_A [2, 4] has rank 2 but lora_B [3, 1] has rank 1",
                       Error);
  CHECK_THROWS_WITH_AS(module_of({{1, NAN, 0, 0}}, kB1),
                       "test: module 'm': lora_A holds a non-finite value at element 1", Error);
  CHECK_THROWS_WITH_AS(module_of(kA1, {{1}, {INFINITY}, {0}}),
                       "test: module 'm': lora_B holds a non-finite value at element 1", Error);
}

// ------------------------------------------------------------------ task merging

namespace {
const std::vector<float> kT1 = {0.5f, -0.2f, 0.1f, -0.9f, 0.05f, 0.3f};
const std::vector<float> kT2 = {-0.4f, 0.6f, -0.3f, -0.2f, 0.7f, -0.1f};
const std::vector<float> kT3 = {0.2f, 0.1f, -0.8f, 0.4f, -0.6f, 0.25f};
const std::vector<double> kW = {1.0, 0.5, 1.0};

void check_vec(const std::vector<float>& got, const std::vector<double>& want, double tol = 1e-6) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(std::fabs(got[i] - want[i]) <= tol);
  }
}

std::vector<float> run(TaskMergeMethod m, TaskMergeOptions o) {
  return merge_tasks(m, {kT1.data(), kT2.data(), kT3.data()}, 6, kW, o);
}
}  // namespace

TEST_CASE("task merging: the magnitude-based golden rows") {
  TaskMergeOptions o;
  o.density = 0.5;
  check_vec(run(TaskMergeMethod::kMagnitudePrune, o), {0.3, 0.3, -0.8, -0.5, -0.25, 0.3});
  check_vec(run(TaskMergeMethod::kTies, o), {0.5, 0.3, -0.8, -0.9, 0.35, 0.3});
  o.majority_sign = MajoritySign::kFrequency;
  check_vec(run(TaskMergeMethod::kTies, o), {0.5, 0.3, -0.8, 0.4, 0.35, 0.3});
  o.majority_sign = MajoritySign::kTotal;
  check_vec(run(TaskMergeMethod::kMergekitTies, o), {0.5, 0.6, -0.8, -0.9, -0.6, 0.3});
  o.normalize = false;
  check_vec(run(TaskMergeMethod::kMergekitTies, o), {0.5, 0.3, -0.8, -0.9, -0.6, 0.3});
  o.normalize = true;
  o.majority_sign = MajoritySign::kFrequency;
  check_vec(run(TaskMergeMethod::kMergekitTies, o), {0.5, 0.6, -0.8, 0.4, 0.7, 0.3});
  check_vec(run(TaskMergeMethod::kTaskArithmetic, {}), {0.5, 0.2, -0.85, -0.6, -0.2, 0.5});
  check_vec(run(TaskMergeMethod::kMergekitLinear, {}), {0.2, 0.08, -0.34, -0.24, -0.08, 0.2});
  const std::vector<double> x(kT1.begin(), kT1.end());
  const auto p = magnitude_prune(x.data(), 6, 0.5);
  CHECK(p == std::vector<double>{kT1[0], 0, 0, kT1[3], 0, kT1[5]});
}

TEST_CASE("task merging: the DARE golden rows with a fixed mask") {
  const std::vector<std::vector<std::uint8_t>> masks = {
      {1, 0, 1, 0, 1, 0}, {0, 1, 1, 0, 0, 1}, {1, 1, 0, 0, 1, 0}};
  TaskMergeOptions o;
  o.density = 0.5;
  o.masks = &masks;
  check_vec(run(TaskMergeMethod::kDareLinear, o), {1.4, 0.8, -0.1, 0, -1.1, -0.1});
  check_vec(run(TaskMergeMethod::kDareTies, o), {0.7, 0.4, -0.3, 0, -1.2, -0.1});
  check_vec(run(TaskMergeMethod::kMergekitDareLinear, o),
            {2.099145, 0.951111, -0.029615, 0, -1.408974, -0.115});
  check_vec(run(TaskMergeMethod::kMergekitDareTies, o),
            {2.099145, 0.951111, -0.345, 0, -1.566667, -0.115});
  o.normalize = true;
  check_vec(run(TaskMergeMethod::kMergekitDareTies, o),
            {1.049573, 0.634074, -0.69, 0, -1.566667, -0.23});
}

TEST_CASE("DARE masks are pinned, seeded and keep about density of the entries") {
  const auto m = dare_mask(16, 0.5, 42, "q_proj.lora_A", 0);
  CHECK(m == dare_mask(16, 0.5, 42, "q_proj.lora_A", 0));
  CHECK(m != dare_mask(16, 0.5, 43, "q_proj.lora_A", 0));
  CHECK(m != dare_mask(16, 0.5, 42, "q_proj.lora_A", 1));
  const auto big = dare_mask(100000, 0.3, 7, "x", 2);
  std::size_t kept = 0;
  for (auto b : big) kept += b;
  CHECK(kept > 29500);
  CHECK(kept < 30500);
  std::string pinned;
  for (auto b : m) pinned += b ? '1' : '0';
  CHECK(pinned == "1010101101100011");
}

TEST_CASE("breadcrumbs, DELLA, model_stock and SLERP") {
  const std::vector<double> v{0.05, -0.9, 0.3, -0.12, 0.6, 0.01, -0.45, 0.2, 0.07, -0.33};
  // gamma 0.1: n_top = 1, n_bot = 3; the largest (-0.9) and the three smallest go.
  CHECK(breadcrumbs_prune(v.data(), 10, 0.6, 0.1) ==
        std::vector<double>{0, 0, 0.3, -0.12, 0.6, 0, -0.45, 0.2, 0, -0.33});
  // gamma 0.01: n_top = 0. mergekit's slice [n_bot:-0] is empty and prunes everything; here
  // the top ⌊0.6·10⌋ = 6 stay.
  CHECK(breadcrumbs_prune(v.data(), 10, 0.6, 0.01) ==
        std::vector<double>{0, -0.9, 0.3, 0, 0.6, 0, -0.45, 0.2, 0, -0.33});
  // n_bot < 0 (density 0.9, gamma 0.2: n_top 2, n_bot -1): n_top shrinks to 1, nothing small goes.
  CHECK(breadcrumbs_prune(v.data(), 10, 0.9, 0.2) ==
        std::vector<double>{0.05, 0, 0.3, -0.12, 0.6, 0.01, -0.45, 0.2, 0.07, -0.33});
  // Through merge_tasks: one model, weight 1, base 0 gives the pruned tensor.
  const std::vector<float> vf(v.begin(), v.end());
  TaskMergeOptions o;
  o.density = 0.6;
  o.gamma = 0.1;
  check_vec(merge_tasks(TaskMergeMethod::kMergekitBreadcrumbs, {vf.data()}, 10, {1.0}, o),
            {0, 0, 0.3, -0.12, 0.6, 0, -0.45, 0.2, 0, -0.33});

  const std::vector<double> row{0.1, -0.4, 0.3, 0.2};
  const auto p = della_keep_probabilities(row.data(), 4, 0.5, 0.15);
  const std::vector<double> want_p{0.35, 0.65, 0.55, 0.45};
  for (std::size_t i = 0; i < 4; ++i) CHECK(p[i] == doctest::Approx(want_p[i]).epsilon(1e-12));
  // Two rows rank separately.
  const std::vector<double> two{0.1, -0.4, 0.3, 0.2, 4, 3, 2, 1};
  const auto p2 = della_keep_probabilities(two.data(), 8, 0.5, 0.15, 4);
  CHECK(p2[4] == doctest::Approx(0.65));
  CHECK(p2[7] == doctest::Approx(0.35));
  CHECK_THROWS_WITH_AS(della_keep_probabilities(row.data(), 4, 0.1, 0.15),
                       "della: density ± epsilon (0.1 ± 0.15) must lie in (0, 1)", Error);
  // DELLA with a fixed mask: kept entries, L1-rescaled to the tensor's norm (1.0 / 0.7).
  const std::vector<float> rf(row.begin(), row.end());
  const std::vector<std::vector<std::uint8_t>> keep{{0, 1, 1, 0}};
  o = {};
  o.density = 0.5;
  o.masks = &keep;
  check_vec(merge_tasks(TaskMergeMethod::kMergekitDellaLinear, {rf.data()}, 4, {1.0}, o),
            {0, -0.4 / 0.7, 0.3 / 0.7, 0});
  // Drawn masks are reproducible and keep the larger entries more often.
  o.masks = nullptr;
  o.seed = 5;
  std::vector<float> big(4000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 4 + 1);
  o.rescale = false;
  const auto d1 = merge_tasks(TaskMergeMethod::kMergekitDellaLinear, {big.data()}, 4000, {1.0}, o);
  CHECK(d1 == merge_tasks(TaskMergeMethod::kMergekitDellaLinear, {big.data()}, 4000, {1.0}, o));
  o.row_len = 4;  // ranks 1..4 in every row: keep rates 0.35, 0.45, 0.55, 0.65
  const auto d2 = merge_tasks(TaskMergeMethod::kMergekitDellaLinear, {big.data()}, 4000, {1.0}, o);
  std::size_t kept[4] = {0, 0, 0, 0};
  for (std::size_t i = 0; i < d2.size(); ++i) kept[i % 4] += d2[i] != 0 ? 1 : 0;
  CHECK(kept[0] > 280);
  CHECK(kept[0] < 420);
  CHECK(kept[3] > 580);
  CHECK(kept[3] < 720);

  const std::vector<float> w0{1, 1, 1, 1}, w1{2, 2, 1, 1}, w2{2, 1, 2, 1};
  check_vec(model_stock(w0.data(), {w1.data(), w2.data()}, 4), {1.666667, 1.333333, 1.333333, 1.0});
  // filter_wise, rows of 2: row 0's task vectors (1, 1) and (1, 0) give cos = 1/√2; row 1's
  // (0, 0) and (1, 0) give cos = 0 (the norm product clamped to 1e-6), so t = 0: the base.
  {
    const double c = 1 / std::sqrt(2.0), t = 2 * c / (1 + c);
    check_vec(model_stock(w0.data(), {w1.data(), w2.data()}, 4, 2),
              {t * 2 + (1 - t), t * 1.5 + (1 - t), 1.0, 1.0});
  }
  CHECK_THROWS_WITH_AS(model_stock(w0.data(), {w1.data()}, 4),
                       "model_stock: needs the base and at least 2 fine-tuned models, got 1",
                       Error);

  const std::vector<float> a{1, 0, 0, 1}, b{0, 1, 1, 0};
  check_vec(slerp(a.data(), b.data(), 4, 0.5), {0.707107, 0.707107, 0.707107, 0.707107});
  const std::vector<float> c2{2, 0}, c1{0, 1};
  check_vec(slerp(c2.data(), c1.data(), 2, 0.25), {1.847759, 0.382683});
  // Nearly parallel: lerp.
  const std::vector<float> e0{1, 0}, e1{1, 0.001f};
  check_vec(slerp(e0.data(), e1.data(), 2, 0.5), {1.0, 0.0005});
}

TEST_CASE("task merging rejects bad density, weights and names") {
  TaskMergeOptions o;
  o.density = 0.0;
  CHECK_THROWS_WITH_AS(run(TaskMergeMethod::kTies, o), "ties: density = 0 is outside (0, 1]",
                       Error);
  o.density = 1.5;
  CHECK_THROWS_WITH_AS(run(TaskMergeMethod::kDareLinear, o),
                       "dare_linear: density = 1.5 is outside (0, 1]", Error);
  CHECK_THROWS_WITH_AS(merge_tasks(TaskMergeMethod::kTies, {kT1.data()}, 6, {NAN}),
                       "ties: weight 0 = nan is not finite", Error);
  CHECK_THROWS_WITH_AS(parse_task_merge_method("tie"),
                       doctest::Contains("unknown task merge method 'tie'"), Error);
}

// ------------------------------------------------------------------ combination

namespace {
LoraAdapter client(int k, double scaling = 1.0) {
  return adapter_of(k == 1 ? "c1" : "c2",
                    {k == 1 ? module_of(kA1, kB1, scaling) : module_of(kA2, kB2, scaling)});
}
}  // namespace

TEST_CASE("combine cat is FLoRA stacking and exact") {
  const auto c1 = client(1), c2 = client(2);
  const auto r = combine_adapters({&c1, &c2}, {0.25, 0.75}, {});
  REQUIRE(r.modules.size() == 1);
  const auto& m = r.modules[0];
  CHECK(m.rank() == 3);
  CHECK(m.scaling == 1.0);
  check_rows(rows_of(m.a), {{0.25, 0, 0.5, 0}, {0, 0.75, 0, 0.75}, {0.75, 0, 0, 0}}, 0.0);
  check_rows(rows_of(m.b), {{1, 1, 0}, {2, 0, 1}, {0, 1, 1}}, 0.0);
  check_rows(product(m), kM, 0.0);
}

TEST_CASE("combine linear weights each factor by the square root") {
  // Both stored at r = 2, client 1's second component zero.
  const auto c1 =
      adapter_of("c1", module_of({{1, 0, 2, 0}, {0, 0, 0, 0}}, {{1, 0}, {2, 0}, {0, 0}}));
  const auto c2 = client(2);
  CombineOptions o;
  o.type = CombinationType::kLinear;
  const auto r = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  const auto& m = r.modules[0];
  check_rows(rows_of(m.a), {{0.5, 0.866025, 1.0, 0.866025}, {0.866025, 0, 0, 0}}, 1e-6);
  check_rows(rows_of(m.b), {{1.366025, 0}, {1.0, 0.866025}, {0.866025, 0.866025}}, 1e-6);
  check_rows(product(m),
             {{0.683013, 1.183013, 1.366025, 1.183013},
              {1.25, 0.866025, 1.0, 0.866025},
              {1.183013, 0.75, 0.866025, 0.75}},
             1e-5);
  const auto c1r1 = client(1);
  CHECK_THROWS_WITH_AS(combine_adapters({&c1r1, &c2}, {0.25, 0.75}, o),
                       "combine_adapters: 'linear' needs equal ranks, but module 'm' has rank 1 "
                       "in 'c1' and 2 in 'c2' (use cat or an svd type)",
                       Error);
}

TEST_CASE("combine svd truncates the exact sum") {
  const auto c1 = client(1), c2 = client(2);
  CombineOptions o;
  o.type = CombinationType::kSvd;  // new rank = max(1, 2) = 2
  const auto r = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  CHECK(r.modules[0].rank() == 2);
  check_rows(product(r.modules[0]),
             {{0.473275, 0.719272, 0.217860, 0.719272},
              {1.255178, -0.000713, 0.993457, -0.000713},
              {0.543688, 0.778393, 0.260704, 0.778393}},
             1e-5);
  // The factored SVD's singular values are M's.
  const LowRankSvd s = factored_svd({&c1.modules[0].b, &c2.modules[0].b},
                                    {&c1.modules[0].a, &c2.modules[0].a}, {0.25, 0.75}, 3);
  REQUIRE(s.sigma.size() == 3);
  CHECK(s.sigma[0] == doctest::Approx(1.993047).epsilon(1e-6));
  CHECK(s.sigma[1] == doctest::Approx(1.213138).epsilon(1e-6));
  CHECK(s.sigma[2] == doctest::Approx(0.493516).epsilon(1e-6));
  // Dense and factored paths agree: magnitude_prune_svd at density 1 is plain task
  // arithmetic on the dense D_k.
  o.type = CombinationType::kMagnitudePruneSvd;
  o.density = 1.0;
  o.svd_rank = 3;
  const auto full = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  check_rows(product(full.modules[0]), kM, 1e-6);
}

TEST_CASE("combine with scalings other than 1 (PEFT's s² in the svd family)") {
  const auto c1 = client(1, 2.0), c2 = client(2, 1.0);
  const auto cat = combine_adapters({&c1, &c2}, {0.25, 0.75}, {});
  check_rows(rows_of(cat.modules[0].a), {{0.5, 0, 1, 0}, {0, 0.75, 0, 0.75}, {0.75, 0, 0, 0}}, 0.0);
  const Rows exact = {{0.5, 0.75, 1, 0.75}, {1.75, 0, 2, 0}, {0.75, 0.75, 0, 0.75}};
  check_rows(product(cat.modules[0]), exact, 0.0);
  CombineOptions o;
  o.type = CombinationType::kSvd;
  o.svd_rank = 3;
  const auto peft = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  check_rows(product(peft.modules[0]), {{1, 0.75, 2, 0.75}, {2.75, 0, 4, 0}, {0.75, 0.75, 0, 0.75}},
             1e-6);
  o.peft_svd_scaling = false;
  const auto fed = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  check_rows(product(fed.modules[0]), exact, 1e-6);
}

TEST_CASE("combine: pruning types on factors, clamp, and bad input") {
  const auto c1 =
      adapter_of("c1", module_of({{1, 0, 2, 0}, {0, 0, 0, 0}}, {{1, 0}, {2, 0}, {0, 0}}));
  const auto c2 = client(2);
  CombineOptions o;
  o.type = CombinationType::kMagnitudePrune;
  o.density = 0.5;
  const auto r = combine_adapters({&c1, &c2}, {0.25, 0.75}, o);
  // A list: sqrt weights (0.5, 0.866025); each A pruned to its top 4 of 8 by |x|.
  // c1's A keeps {1, 2} (2 nonzeros, then zeros by index 1, 3), c2's keeps its three ones and a 0.
  const auto a = rows_of(r.modules[0].a);
  CHECK(a[0][2] == doctest::Approx(1.0));
  CHECK(a[0][1] == doctest::Approx(0.866025).epsilon(1e-6));
  o.type = CombinationType::kSvd;
  o.svd_clamp = 0.5;
  const auto c1r1 = client(1);
  const auto clamped = combine_adapters({&c1r1, &c2}, {0.25, 0.75}, o);
  double hi = 0;
  for (const auto* t : {&clamped.modules[0].a, &clamped.modules[0].b}) {
    for (std::uint64_t i = 0; i < t->numel(); ++i)
      hi = std::max(hi, double{std::fabs(t->view().data_as<float>()[i])});
  }
  CHECK(hi < 1.0);  // the median of |entries| bounds every entry
  CHECK_THROWS_WITH_AS(parse_combination_type("svdd"),
                       doctest::Contains("unknown combination type 'svdd'"), Error);
  o = {};
  o.type = CombinationType::kTies;
  o.density = 0;
  CHECK_THROWS_WITH_AS(combine_adapters({&c1, &c2}, {0.25, 0.75}, o),
                       "combine_adapters: density = 0 is outside (0, 1]", Error);
  CHECK_THROWS_WITH_AS(combine_adapters({&c1, &c2}, {0.25, INFINITY}, {}),
                       "combine_adapters: the weight of adapter 'c2' is inf, not finite", Error);
  const auto wide = adapter_of("wide", module_of({{1, 0, 2, 0, 1}}, kB1));
  CHECK_THROWS_WITH_AS(combine_adapters({&c2, &wide}, {1, 1}, {}),
                       "combine_adapters: module 'm' is 3x4 in 'c2' but 3x5 (or another "
                       "kind/layout) in 'wide'",
                       Error);
}

// ------------------------------------------------------------------ federated rules

TEST_CASE("FLoRA stacks exactly") {
  const auto c1 = client(1), c2 = client(2);
  const auto r = federated_lora(FederatedRule::kFlora, {{&c1, 100}, {&c2, 300}});
  CHECK(r.exact);
  check_rows(product(r.global.modules[0]), kM, 0.0);
  REQUIRE(r.clients.size() == 2);
  check_rows(product(r.clients[0].modules[0]), kM, 0.0);
}

TEST_CASE("FedIT with zero padding and HetLoRA") {
  const auto c1 = client(1), c2 = client(2);
  const auto f = federated_lora(FederatedRule::kFedIt, {{&c1, 100}, {&c2, 300}});
  CHECK_FALSE(f.exact);
  check_rows(rows_of(f.global.modules[0].a), {{0.25, 0.75, 0.5, 0.75}, {0.75, 0, 0, 0}}, 0.0);
  check_rows(rows_of(f.global.modules[0].b), {{1, 0}, {0.5, 0.75}, {0.75, 0.75}}, 0.0);
  check_rows(product(f.global.modules[0]),
             {{0.25, 0.75, 0.5, 0.75},
              {11.0 / 16, 3.0 / 8, 0.25, 3.0 / 8},
              {0.75, 9.0 / 16, 3.0 / 8, 9.0 / 16}},
             0.0);
  check_rows(rows_of(f.clients[0].modules[0].a), {{0.25, 0.75, 0.5, 0.75}}, 0.0);
  check_rows(rows_of(f.clients[0].modules[0].b), {{1}, {0.5}, {0.75}}, 0.0);
  CHECK(f.clients[1].modules[0].rank() == 2);

  const auto h = federated_lora(FederatedRule::kHetLora, {{&c1, 100}, {&c2, 300}});
  check_rows(rows_of(h.global.modules[0].a),
             {{0.671187, 0.328813, 1.342374, 0.328813}, {0.328813, 0, 0, 0}}, 1e-6);
  check_rows(rows_of(h.global.modules[0].b), {{1, 0}, {1.342374, 0.328813}, {0.328813, 0.328813}},
             1e-6);
  check_rows(product(h.global.modules[0]),
             {{0.671187, 0.328813, 1.342374, 0.328813},
              {1.009102, 0.441390, 1.801967, 0.441390},
              {0.328813, 0.108118, 0.441390, 0.108118}},
             1e-6);
  check_rows(product(h.clients[0].modules[0]),
             {{0.671187, 0.328813, 1.342374, 0.328813},
              {0.900984, 0.441390, 1.801967, 0.441390},
              {0.220695, 0.108118, 0.441390, 0.108118}},
             1e-6);
}

TEST_CASE("FFA-LoRA averages B under a shared A, exactly") {
  const auto c1 = adapter_of("c1", module_of(kA2, {{1, 0}, {2, 0}, {0, 0}}));
  const auto c2 = client(2);
  const auto r = federated_lora(FederatedRule::kFfaLora, {{&c1, 1}, {&c2, 3}});
  CHECK(r.exact);
  check_rows(rows_of(r.global.modules[0].b), {{1, 0}, {0.5, 0.75}, {0.75, 0.75}}, 0.0);
  check_rows(product(r.global.modules[0]),
             {{0, 1, 0, 1}, {0.75, 0.5, 0, 0.5}, {0.75, 0.75, 0, 0.75}}, 0.0);
  const auto other = adapter_of("c3", module_of({{0, 1, 0, 1}, {1, 0, 0, 1}}, kB2));
  CHECK_THROWS_WITH_AS(federated_lora(FederatedRule::kFfaLora, {{&c2, 1}, {&other, 1}}),
                       "ffa-lora: module 'm': lora_A of 'c3' differs from that of 'c2'; FFA-LoRA "
                       "needs the same frozen A on every client",
                       Error);
}

TEST_CASE("FedEx-LoRA's residual is exact and the least-squares B correction") {
  const auto c1 = client(1), c2 = client(2);
  const auto r = federated_lora(FederatedRule::kFedExLora, {{&c1, 100}, {&c2, 300}});
  CHECK(r.exact);
  // Clients get FedIT's average.
  check_rows(product(r.global.modules[0]),
             {{0.25, 0.75, 0.5, 0.75},
              {11.0 / 16, 3.0 / 8, 0.25, 3.0 / 8},
              {0.75, 9.0 / 16, 3.0 / 8, 9.0 / 16}},
             0.0);
  check_rows(
      product(r.clients[0].modules[0]),
      product(
          federated_lora(FederatedRule::kFedIt, {{&c1, 100}, {&c2, 300}}).clients[0].modules[0]),
      0.0);
  // The residual, low-rank (rank 1 + 2 + 2), is M − B̄Ā exactly.
  REQUIRE(r.residual.modules.size() == 1);
  CHECK(r.residual.modules[0].rank() == 5);
  const Rows res = product(r.residual.modules[0]);
  check_rows(
      res, {{0, 0, 0, 0}, {9.0 / 16, -3.0 / 8, 0.75, -3.0 / 8}, {0, 3.0 / 16, -3.0 / 8, 3.0 / 16}},
      1e-7);
  // W0 + residual + B̄Ā = W0 + M, through the merge kernel: merging both into W0 = 0 gives M.
  Tensor w = Tensor::zeros(DType::kF32, Shape{3, 4});
  merge_lora(w.view(), r.residual.modules[0]);
  merge_lora(w.view(), r.global.modules[0]);
  check_rows(rows_of(w), kM, 1e-7);

  // Least-squares correction (λ = 0): ΔB = (M − B̄Ā)Āᵀ(ĀĀᵀ)⁻¹.
  const auto l = federated_lora(FederatedRule::kLoraFairLs, {{&c1, 100}, {&c2, 300}});
  CHECK_FALSE(l.exact);
  check_rows(rows_of(l.global.modules[0].b),
             {{1, 0}, {0.5 - 3.0 / 22, 0.75 + 35.0 / 44}, {0.75 + 3.0 / 44, 0.75 - 1.0 / 44}},
             1e-6);
  check_rows(product(l.global.modules[0]),
             {{0.25, 0.75, 0.5, 0.75},
              {1.25, 0.272727, 0.181818, 0.272727},
              {0.75, 0.613636, 0.409091, 0.613636}},
             1e-6);
  // The Frobenius error falls from 1.170937 (FedIT) to 1.011300.
  auto error = [&](const Rows& p) {
    double e = 0;
    for (std::size_t i = 0; i < 3; ++i) {
      for (std::size_t j = 0; j < 4; ++j) e += (kM[i][j] - p[i][j]) * (kM[i][j] - p[i][j]);
    }
    return std::sqrt(e);
  };
  CHECK(error(product(r.global.modules[0])) == doctest::Approx(1.170937).epsilon(1e-6));
  CHECK(error(product(l.global.modules[0])) == doctest::Approx(1.011300).epsilon(1e-6));
  // Client 1 (rank 1) gets the first column of the corrected B with Ā's first row.
  check_rows(rows_of(l.clients[0].modules[0].b), {{1}, {0.5 - 3.0 / 22}, {0.75 + 3.0 / 44}}, 1e-6);
  // Rules that average factors need one scaling.
  const auto c3 = client(2, 2.0);
  CHECK_THROWS_WITH_AS(
      federated_lora(FederatedRule::kFedExLora, {{&c1, 1}, {&c3, 1}}),
      doctest::Contains("fedex-lora: module 'm' has scaling 1 in 'c1' but 2 in 'c2'"), Error);
  CHECK(parse_federated_rule("lora-fair-ls") == FederatedRule::kLoraFairLs);
  CHECK(std::string(federated_rule_name(FederatedRule::kFedSaLora)) == "fedsa-lora");
}

TEST_CASE("FedSA-LoRA shares the averaged A, Fed-SB averages R exactly") {
  const auto c1 = client(1), c2 = client(2);
  const auto r = federated_lora(FederatedRule::kFedSaLora, {{&c1, 100}, {&c2, 300}});
  CHECK_FALSE(r.exact);
  check_rows(product(r.clients[0].modules[0]),
             {{0.25, 0.75, 0.5, 0.75}, {0.5, 1.5, 1, 1.5}, {0, 0, 0, 0}}, 0.0);
  check_rows(product(r.clients[1].modules[0]),
             {{0.25, 0.75, 0.5, 0.75}, {0.75, 0, 0, 0}, {1, 0.75, 0.5, 0.75}}, 0.0);
  check_rows(rows_of(r.clients[1].modules[0].b), kB2, 0.0);  // its own B
  check_rows(rows_of(r.global.modules[0].a), {{0.25, 0.75, 0.5, 0.75}, {0.75, 0, 0, 0}}, 0.0);

  const Tensor r1 = mat({{1, 0}, {0, 0}}), r2 = mat({{0, 1}, {1, 0}});
  const Tensor mean = fed_sb_average({&r1, &r2}, {1, 1});
  check_rows(rows_of(mean), {{0.5, 0.5}, {0.5, 0}}, 0.0);
  // B·R̄·A = mean of B·R_k·A, as one module with B' = B·R̄.
  Rows br(3, std::vector<double>(2, 0.0));
  const Rows rm = rows_of(mean);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 2; ++j) br[i][j] = kB2[i][0] * rm[0][j] + kB2[i][1] * rm[1][j];
  }
  check_rows(product(module_of(kA2, br)), {{0.5, 0.5, 0, 0.5}, {0, 0.5, 0, 0.5}, {0.5, 1, 0, 1}},
             0.0);
  const Tensor bad = mat({{1, 0, 0}, {0, 1, 0}});
  CHECK_THROWS_WITH_AS(
      fed_sb_average({&r1, &bad}, {1, 1}),
      "fed_sb_average: matrix 1 is F32 [2, 3]; every R must be the same square F32 r x r", Error);
  CHECK_THROWS_WITH_AS(fed_sb_average({&r1, &r2}, {0, 0}),
                       "fed_sb_average: the weights are all zero", Error);
}

TEST_CASE("FlexLoRA hands each client its best rank-r_k approximation") {
  const Rows m1 = {{0.686747, 0.398499, 0.456665, 0.398499},
                   {0.905161, 0.525238, 0.601904, 0.525238},
                   {0.765928, 0.444445, 0.509318, 0.444445}};
  const Rows m2 = {{0.473275, 0.719272, 0.217860, 0.719272},
                   {1.255178, -0.000713, 0.993457, -0.000713},
                   {0.543688, 0.778393, 0.260704, 0.778393}};
  const auto d1 = client(1), d2 = client(2);
  const auto g = federated_lora(FederatedRule::kFlexLora, {{&d1, 100}, {&d2, 300}});
  CHECK(g.global.modules[0].rank() == 2);
  check_rows(product(g.clients[0].modules[0]), m1, 1e-5);
  check_rows(product(g.clients[1].modules[0]), m2, 1e-5);
  // Client scalings are folded in and honoured: with s1 = 2 and weights 1:6, p = (1/7, 6/7)
  // and Σ p_k·s_k·B_k·A_k = (2/7)ΔW1 + (6/7)ΔW2 = (8/7)·M, so client k's s_k·B·A must be
  // (8/7) times the approximations above, whatever its own scaling.
  const auto c1 = client(1, 2.0), c2 = client(2);
  const auto r = federated_lora(FederatedRule::kFlexLora, {{&c1, 1}, {&c2, 6}});
  CHECK(r.clients[0].modules[0].scaling == 2.0);
  auto scaled = [](Rows x) {
    for (auto& row : x)
      for (double& e : row) e *= 8.0 / 7.0;
    return x;
  };
  check_rows(product(r.clients[0].modules[0]), scaled(m1), 1e-5);
  check_rows(product(r.clients[1].modules[0]), scaled(m2), 1e-5);
}

TEST_CASE("federated rules reject bad weights and mixed scalings") {
  const auto c1 = client(1), c2 = client(2, 2.0);
  CHECK_THROWS_WITH_AS(federated_lora(FederatedRule::kFedIt, {{&c1, 0}, {&c2, 0}}),
                       "fedit: the client weights are all zero", Error);
  CHECK_THROWS_WITH_AS(federated_lora(FederatedRule::kFedIt, {{&c1, -1}, {&c2, 1}}),
                       "fedit: client 'c1' has weight -1 (weights must be finite and >= 0)", Error);
  CHECK_THROWS_WITH_AS(federated_lora(FederatedRule::kHetLora, {{&c1, 1}, {&c2, 1}}),
                       "hetlora: module 'm' has scaling 1 in 'c1' but 2 in 'c2'; this rule "
                       "averages factors and needs one scaling (use flora or flexlora)",
                       Error);
  CHECK_THROWS_WITH_AS(parse_federated_rule("fedavg"),
                       doctest::Contains("unknown federated LoRA rule 'fedavg'"), Error);
}

// ------------------------------------------------------------------ lifting

TEST_CASE("lifted adapters merge into their plan's block and stack to the exact sum") {
  using namespace edgefuse_test;
  const auto cfg = llama_config(16, 4, 2, 4, 24, 40, 3);
  const Schema schema = Schema::preset("llama", cfg);
  const auto metas = llama_tensor_metas(cfg, DType::kF32);
  const ModelLayout layout = schema.bind(metas);
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<NamedTensor> target;
  for (const auto& m : metas) {
    Tensor t = Tensor::empty(m.dtype, m.shape);
    for (std::uint64_t i = 0; i < t.numel(); ++i) t.view().data_as<float>()[i] = u(rng);
    target.push_back({m.name, std::move(t)});
  }
  // Two clients: different windows and layers (client 1 keeps layers 0 and 2 -> local 0, 1).
  Plan p1, p2;
  p1.axes["hidden"] = {1, 3, 4, 8, 9, 15};
  p1.axes["mlp"] = {0, 5, 6, 7, 20};
  p1.axes["layers"] = {0, 2};
  p2.axes["hidden"] = {0, 1, 2, 3, 4, 5, 6, 7};
  p2.axes["mlp"] = {10, 11, 12, 13, 14, 15};
  p2.axes["layers"] = {2};
  auto sub_adapter = [&](const Plan& p, const std::string& label) {
    const auto cts = client_tensors(layout, p);
    LoraAdapter a;
    a.label = label;
    for (const auto& ct : cts) {
      const std::string& n = ct.name;
      const bool wanted = n.find("mlp.up_proj.weight") != std::string::npos ||
                          n.find("self_attn.q_proj.weight") != std::string::npos;
      if (!wanted) continue;
      const std::uint64_t out = ct.shape[0], in = ct.shape[1], r = 3;
      Tensor ta = Tensor::empty(DType::kF32, Shape{r, in}),
             tb = Tensor::empty(DType::kF32, Shape{out, r});
      for (std::uint64_t i = 0; i < ta.numel(); ++i) ta.view().data_as<float>()[i] = u(rng);
      for (std::uint64_t i = 0; i < tb.numel(); ++i) tb.view().data_as<float>()[i] = u(rng);
      a.modules.push_back(
          make_lora_module(n.substr(0, n.size() - 7), ta.view(), tb.view(), 0.5, label));
    }
    std::sort(a.modules.begin(), a.modules.end(),
              [](const LoraModule& x, const LoraModule& y) { return x.module < y.module; });
    return a;
  };
  const LoraAdapter s1 = sub_adapter(p1, "client1"), s2 = sub_adapter(p2, "client2");
  REQUIRE(s1.modules.size() == 4);
  REQUIRE(s2.modules.size() == 2);
  CHECK(s1.find("model.layers.1.mlp.up_proj") != nullptr);  // local numbering
  const LoraAdapter l1 = lift_adapter(s1, layout, p1), l2 = lift_adapter(s2, layout, p2);
  CHECK(l1.find("model.layers.2.mlp.up_proj") != nullptr);  // target numbering
  CHECK(l1.find("model.layers.1.mlp.up_proj") == nullptr);

  // (1) Merging a lifted adapter into the target == merging the sub adapter into the
  // extracted sub-model and writing the block back: compare through extract().
  std::vector<NamedTensor> merged;
  for (const auto& t : target) {
    Tensor c = Tensor::empty(t.tensor.dtype(), t.tensor.shape());
    std::memcpy(c.view().bytes(), t.tensor.view().bytes(), t.tensor.nbytes());
    merged.push_back({t.name, std::move(c)});
  }
  for (const auto& m : l1.modules) {
    for (auto& t : merged) {
      if (t.name == m.weight_name()) merge_lora(t.tensor.view(), m);
    }
  }
  auto sub = extract(views_of(target), layout, p1);
  for (const auto& m : s1.modules) {
    for (auto& t : sub) {
      if (t.name == m.weight_name()) merge_lora(t.tensor.view(), m);
    }
  }
  const auto sub_after = extract(views_of(merged), layout, p1);
  REQUIRE(sub_after.size() == sub.size());
  for (std::size_t i = 0; i < sub.size(); ++i) {
    CAPTURE(sub[i].name);
    CHECK(std::memcmp(sub[i].tensor.view().bytes(), sub_after[i].tensor.view().bytes(),
                      sub[i].tensor.nbytes()) == 0);
  }
  // Outside the block the target is unchanged: the lifted ΔW is exactly zero there.
  const auto& up2 = l1.find("model.layers.2.mlp.up_proj");
  const Rows d = product(*up2);
  std::size_t nonzero = 0;
  for (const auto& row : d)
    for (double x : row) nonzero += x != 0.0;
  CHECK(nonzero == 5 * 6);  // |mlp| x |hidden| of the plan

  // (2) Stacking the lifted adapters (cat, weights 1) gives the exact sum of both updates.
  const auto stacked = combine_adapters({&l1, &l2}, {1.0, 1.0}, {});
  const auto* st = stacked.find("model.layers.2.mlp.up_proj");
  REQUIRE(st != nullptr);
  const Rows sum = product(*st);
  const Rows a = product(*l1.find("model.layers.2.mlp.up_proj"));
  const Rows b = product(*l2.find("model.layers.2.mlp.up_proj"));
  for (std::size_t i = 0; i < sum.size(); ++i) {
    for (std::size_t j = 0; j < sum[i].size(); ++j)
      CHECK(std::fabs(sum[i][j] - (a[i][j] + b[i][j])) <= 1e-6);
  }
  // A module the sub-model does not have.
  LoraAdapter bad = clone(s2);
  bad.modules[0].module = "model.layers.0.mlp.nonexistent";
  CHECK_THROWS_WITH_AS(lift_adapter(bad, layout, p2),
                       "lift_adapter: adapter 'client2': module 'model.layers.0.mlp.nonexistent' "
                       "targets 'model.layers.0.mlp.nonexistent.weight', which the plan's "
                       "sub-model does not have",
                       Error);
}
