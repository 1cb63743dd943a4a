// factored_svd (lora/combine.h): the leading triplets of Σ c_k·B_k·A_k against Eigen's
// JacobiSVD of the dense sum in double, on every instruction-set copy this CPU runs; spectra
// with repeated values (kept whole), a rank below k (the fallback), thread invariance and the
// argument checks (non-finite factors included).
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/lora/combine.h"

using namespace edgefuse;

namespace {

using Mat = Eigen::MatrixXd;

struct Problem {
  std::vector<Tensor> b, a;
  std::vector<double> c;
  std::vector<const Tensor*> bp() const {
    std::vector<const Tensor*> p;
    for (const Tensor& t : b) p.push_back(&t);
    return p;
  }
  std::vector<const Tensor*> ap() const {
    std::vector<const Tensor*> p;
    for (const Tensor& t : a) p.push_back(&t);
    return p;
  }
};

Tensor f32_of(const Mat& m) {
  Tensor t = Tensor::empty(DType::kF32, Shape{static_cast<std::uint64_t>(m.rows()),
                                              static_cast<std::uint64_t>(m.cols())});
  float* p = t.view().data_as<float>();
  for (Eigen::Index i = 0; i < m.rows(); ++i) {
    for (Eigen::Index j = 0; j < m.cols(); ++j) p[i * m.cols() + j] = static_cast<float>(m(i, j));
  }
  return t;
}

Mat mat_of(const Tensor& t) {
  const auto r = static_cast<Eigen::Index>(t.shape()[0]),
             c = static_cast<Eigen::Index>(t.shape()[1]);
  const float* p = t.view().data_as<float>();
  Mat m(r, c);
  for (Eigen::Index i = 0; i < r; ++i) {
    for (Eigen::Index j = 0; j < c; ++j) m(i, j) = p[i * c + j];
  }
  return m;
}

// Σ c_k·B_k·A_k in double from the f32 factors.
Mat dense_sum(const Problem& p) {
  Mat d = Mat::Zero(static_cast<Eigen::Index>(p.b[0].shape()[0]),
                    static_cast<Eigen::Index>(p.a[0].shape()[1]));
  for (std::size_t k = 0; k < p.b.size(); ++k) d += p.c[k] * (mat_of(p.b[k]) * mat_of(p.a[k]));
  return d;
}

Mat gaussian(Eigen::Index r, Eigen::Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  Mat m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

// Clients of rank `rank` with Gaussian factors and coefficients in [0.5, 2).
Problem random_problem(int out, int in, int clients, int rank, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.5, 2.0);
  Problem p;
  for (int k = 0; k < clients; ++k) {
    p.b.push_back(f32_of(gaussian(out, rank, rng)));
    p.a.push_back(f32_of(gaussian(rank, in, rng) / std::sqrt(double(in))));
    p.c.push_back(u(rng));
  }
  return p;
}

// Δ = Q_1·diag(s)·Q_2ᵀ split over clients of `rank` columns each (B_k = Q_1 block·diag(s)/c_k,
// A_k = Q_2 blockᵀ): its singular values are s up to the f32 rounding of the factors.
Problem designed_problem(int out, int in, int rank, const std::vector<double>& s,
                         std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto r_total = static_cast<Eigen::Index>(s.size());
  const Mat q1 = Eigen::HouseholderQR<Mat>(gaussian(out, r_total, rng)).householderQ() *
                 Mat::Identity(out, r_total);
  const Mat q2 = Eigen::HouseholderQR<Mat>(gaussian(in, r_total, rng)).householderQ() *
                 Mat::Identity(in, r_total);
  Problem p;
  for (Eigen::Index at = 0; at < r_total; at += rank) {
    const double c = 0.5 + 0.25 * static_cast<double>(p.c.size());
    Mat b = q1.middleCols(at, rank);
    for (Eigen::Index j = 0; j < rank; ++j) b.col(j) *= s[static_cast<std::size_t>(at + j)] / c;
    p.b.push_back(f32_of(b));
    p.a.push_back(f32_of(q2.middleCols(at, rank).transpose()));
    p.c.push_back(c);
  }
  return p;
}

// The result against JacobiSVD of the dense sum: σ to `sigma_tol` relative to σ_1, the rank-k
// product to f32 accuracy, orthonormal kept vectors.
void check_against_dense(const LowRankSvd& got, const Problem& p, Eigen::Index k,
                         double sigma_tol) {
  const Mat d = dense_sum(p);
  const Eigen::JacobiSVD<Mat> ref(d, Eigen::ComputeThinU | Eigen::ComputeThinV);
  REQUIRE(got.sigma.size() == static_cast<std::size_t>(k));
  REQUIRE(got.us.shape() ==
          Shape{static_cast<std::uint64_t>(d.rows()), static_cast<std::uint64_t>(k)});
  REQUIRE(got.vt.shape() ==
          Shape{static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(d.cols())});
  const double s1 = ref.singularValues()(0);
  for (Eigen::Index j = 0; j < k; ++j) {
    CAPTURE(j);
    CHECK(std::fabs(got.sigma[static_cast<std::size_t>(j)] - ref.singularValues()(j)) <=
          sigma_tol * s1);
  }
  const Mat want = ref.matrixU().leftCols(k) * ref.singularValues().head(k).asDiagonal() *
                   ref.matrixV().leftCols(k).transpose();
  const Mat us = mat_of(got.us), vt = mat_of(got.vt);
  CHECK((us * vt - want).cwiseAbs().maxCoeff() <= 1e-5 * s1);
  CHECK((vt * vt.transpose() - Mat::Identity(k, k)).cwiseAbs().maxCoeff() <= 1e-6);
  Mat u = us;
  for (Eigen::Index j = 0; j < k; ++j) {
    if (got.sigma[static_cast<std::size_t>(j)] > 1e-9 * s1)
      u.col(j) /= got.sigma[static_cast<std::size_t>(j)];
  }
  const Eigen::Index nz =
      std::count_if(got.sigma.begin(), got.sigma.end(), [&](double x) { return x > 1e-9 * s1; });
  CHECK(
      (u.leftCols(nz).transpose() * u.leftCols(nz) - Mat::Identity(nz, nz)).cwiseAbs().maxCoeff() <=
      1e-6);
}

bool same_bits(const LowRankSvd& x, const LowRankSvd& y) {
  return x.sigma == y.sigma && x.us.shape() == y.us.shape() && x.vt.shape() == y.vt.shape() &&
         std::memcmp(x.us.view().data(), y.us.view().data(), x.us.view().nbytes()) == 0 &&
         std::memcmp(x.vt.view().data(), y.vt.view().data(), x.vt.view().nbytes()) == 0;
}

}  // namespace

TEST_CASE(
    "factored_svd has a copy for baseline x86-64 and for each wider instruction set the CPU runs") {
  const auto isas = detail::factored_svd_isas();
  REQUIRE(!isas.empty());
  CHECK(isas.front() == "baseline");
  MESSAGE("factored_svd copies on this CPU: ", isas.size(), ", widest ", isas.back());
}

TEST_CASE("factored_svd's leading triplets equal the dense sum's SVD on every instruction set") {
  // 12 clients of rank 8 on 200×180: R = 96, k = 6 (16·k <= R: only the leading triplets).
  const Problem p = random_problem(200, 180, 12, 8, 7);
  for (const std::string& isa : detail::factored_svd_isas()) {
    CAPTURE(isa);
    const LowRankSvd s = detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 6);
    CHECK(s.partial);
    check_against_dense(s, p, 6, 1e-10);
    // The whole-core path (k = 7 > R/16) agrees with it on the first six.
    const LowRankSvd full = detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 7);
    CHECK(!full.partial);
    check_against_dense(full, p, 7, 1e-10);
    for (int j = 0; j < 6; ++j) CHECK(std::fabs(full.sigma[j] - s.sigma[j]) <= 1e-10 * s.sigma[0]);
  }
}

TEST_CASE("factored_svd keeps a repeated leading singular value whole") {
  // σ = 9, 9, 9, 7, 7, 6 | 5.5 ... 0.1 over 96 stacked ranks in clients of rank 12; the factors
  // are f32, so the repeats become a cluster about 1e-7 wide.
  std::vector<double> s = {9, 9, 9, 7, 7, 6};
  for (int j = 0; s.size() < 96; ++j) s.push_back(5.5 - 0.06 * j);
  const Problem p = designed_problem(160, 140, 12, s, 11);
  for (const std::string& isa : detail::factored_svd_isas()) {
    CAPTURE(isa);
    const LowRankSvd got = detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 6);
    CHECK(got.partial);
    check_against_dense(got, p, 6, 1e-10);
    for (int j = 0; j < 6; ++j) CHECK(got.sigma[j] == doctest::Approx(s[j]).epsilon(1e-6));
  }
}

TEST_CASE("factored_svd falls back to the whole core when a kept singular value is zero") {
  // Every B_k lies in the same 2-column space: rank 2, but k = 4 of R = 64. Small integers
  // keep B_k = basis·G_k exact in f32, so the rank is 2 in the f32 factors too.
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> small(-3, 3);
  auto integers = [&](Eigen::Index r, Eigen::Index c) {
    Mat m(r, c);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = small(rng);
    return m;
  };
  const Mat basis = integers(120, 2);
  Problem p;
  for (int k = 0; k < 8; ++k) {
    p.b.push_back(f32_of(basis * integers(2, 8)));
    p.a.push_back(f32_of(gaussian(8, 100, rng)));
    p.c.push_back(1.0 + k);
  }
  for (const std::string& isa : detail::factored_svd_isas()) {
    CAPTURE(isa);
    const LowRankSvd got = detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 4);
    CHECK(!got.partial);
    check_against_dense(got, p, 4, 1e-10);
    CHECK(got.sigma[2] <= 1e-12 * got.sigma[0]);
    CHECK(got.sigma[3] <= 1e-12 * got.sigma[0]);
  }
}

TEST_CASE("factored_svd gives the same bits on 1, 2 and 3 threads") {
  const Problem p = random_problem(150, 170, 10, 10, 3);  // R = 100, k = 5: leading triplets
  const std::size_t saved = num_threads();
  for (const std::string& isa : detail::factored_svd_isas()) {
    CAPTURE(isa);
    set_num_threads(1);
    const LowRankSvd one = detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 5);
    CHECK(one.partial);
    for (std::size_t t : {2, 3}) {
      set_num_threads(t);
      CHECK(same_bits(one, detail::factored_svd_on(isa, p.bp(), p.ap(), p.c, 5)));
    }
  }
  set_num_threads(saved);
}

TEST_CASE("factored_svd rejects bad arguments") {
  const Problem p = random_problem(6, 5, 2, 2, 1);
  auto bp = p.bp(), ap = p.ap();
  CHECK_THROWS_WITH_AS(factored_svd(bp, ap, p.c, 0), "factored_svd: rank must be at least 1",
                       Error);
  CHECK_THROWS_WITH_AS(factored_svd(bp, ap, {1.0}, 2),
                       "factored_svd: 2 B factors, 2 A factors and 1 coefficients", Error);
  CHECK_THROWS_WITH_AS(factored_svd(bp, ap, {1.0, NAN}, 2),
                       "factored_svd: coefficient 1 = nan is not finite", Error);
  Problem nan = random_problem(6, 5, 2, 2, 1);
  nan.a[1] = Tensor::zeros(DType::kF32, Shape{2, 5});
  nan.a[1].view().data_as<float>()[7] = INFINITY;
  CHECK_THROWS_WITH_AS(factored_svd(nan.bp(), nan.ap(), nan.c, 2),
                       "factored_svd: A of pair 1 has the non-finite value inf at [1, 2]", Error);
  const Tensor wide = Tensor::zeros(DType::kF32, Shape{6, 3});
  bp[1] = &wide;
  CHECK_THROWS_WITH_AS(factored_svd(bp, ap, p.c, 2),
                       "factored_svd: pair 1 (B [6, 3], A [2, 5]) does not fit 6x5", Error);
  const Tensor half = Tensor::zeros(DType::kBF16, Shape{6, 2});
  bp[1] = &half;
  CHECK_THROWS_WITH_AS(factored_svd(bp, ap, p.c, 2),
                       "factored_svd: pair 1 is BF16/F32; B and A must be F32", Error);
  CHECK_THROWS_WITH_AS(
      detail::factored_svd_on("neon", p.bp(), p.ap(), p.c, 2),
      doctest::Contains(
          "factored_svd_on: no copy for instruction set 'neon' on this CPU (baseline"),
      Error);
}
