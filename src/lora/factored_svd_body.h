// The factored truncated SVD, once per instruction set (see factored_svd.h). The including file
// defines EDGEFUSE_SVD_NS (the namespace of this copy) and EDGEFUSE_SVD_FN (its entry point).
//
// No standard-library template is used here: one instantiated under AVX flags could replace
// the baseline copy at link time. Helpers are plain functions in an unnamed namespace.
//
// Method, for Δ = Σ_k c_k·B_k·A_k = B_s·A_s with B_s = [c_1·B_1 | …] (out × R)
// and A_s = [A_1; …] (R × in):
//   1. QR: B_s = Q_B·R_B and A_sᵀ = Q_A·R_A (Householder; the two run on two threads).
//   2. Core C = R_B·R_Aᵀ, R×R when R <= out and R <= in (else min(out, R) × min(in, R)).
//   3. The k leading singular triplets of C. When C is square and k is small beside R (16·k <= R),
//      as LAPACK's dgesvdx does: Householder bidiagonalisation C = U_b·D·V_bᵀ; the k largest
//      eigenvalues of the Golub-Kahan matrix T = [[0, Dᵀ], [D, 0]] (perfect-shuffled to a
//      tridiagonal with zero diagonal, eigenvalues ±σ_i) by bisection on Sturm counts; their
//      eigenvectors by inverse iteration with re-orthogonalisation, split into the right (odd
//      entries) and left (even entries) vectors of D; rotated back by U_b, V_b. Every vector
//      is checked (residual and orthogonality); if one fails, or a kept σ is numerically zero,
//      the full SVD below is used instead. Otherwise: Eigen's BDCSVD of C with thin U and V.
//   4. U = Q_B·[U_c; 0], V = Q_A·[V_c; 0] for the k kept vectors only (two threads).
// Cost: O((out + in)·R² + R³) for steps 1-2 and the bidiagonalisation, O(k·R²) for the rest.
//
// Numerics: double precision throughout, f32 only on output. The AVX copies use FMA inside
// Eigen's kernels, so they can differ from the baseline copy in the last bits (each copy is
// tested against a dense Jacobi SVD); each copy gives the same bits at every thread count,
// since the work split is fixed.

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "edgefuse/core/parallel.h"
#include "src/lora/factored_svd.h"

namespace edgefuse::detail::EDGEFUSE_SVD_NS {
namespace {

using Mat = Eigen::MatrixXd;
using Vec = Eigen::VectorXd;
using Index = Eigen::Index;

double max_of(double a, double b) { return a < b ? b : a; }
Index min_of(Index a, Index b) { return a < b ? a : b; }

// Owns a heap object (std::unique_ptr is a standard-library template: see the top).
template <typename T>
struct Owned {
  T* p = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { delete p; }
};

// Runs fn(0) and fn(1), on two threads when the pool has them. Deterministic: the work of each
// call does not depend on where it runs.
template <typename F>
void run_both(F& fn) {
  parallel_for_impl(
      2, 1,
      [](void* ctx, std::size_t begin, std::size_t end) {
        for (std::size_t i = begin; i < end; ++i) (*static_cast<F*>(ctx))(static_cast<int>(i));
      },
      &fn);
}

// Number of eigenvalues of T below x, T symmetric tridiagonal with zero diagonal and
// off-diagonal e (Sturm count of the LDLᵀ pivots, LAPACK dstebz's recurrence; pivots smaller
// than pivmin are replaced by -pivmin).
Index count_below(const Vec& e, double x, double pivmin) {
  const Index n = e.size() + 1;
  Index count = 0;
  double d = -x;
  if (std::fabs(d) < pivmin) d = -pivmin;
  if (d < 0) ++count;
  for (Index i = 1; i < n; ++i) {
    d = -x - e(i - 1) * e(i - 1) / d;
    if (std::fabs(d) < pivmin) d = -pivmin;
    if (d < 0) ++count;
  }
  return count;
}

// The eigenvalue of ascending index `idx` in [0, hi], by bisection to full precision.
double bisect(const Vec& e, Index idx, double hi, double pivmin) {
  double lo = 0;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (!(hi - lo > 2.2e-16 * max_of(std::fabs(lo), std::fabs(hi)) + pivmin) || mid == lo ||
        mid == hi) {
      break;
    }
    if (count_below(e, mid, pivmin) > idx) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return 0.5 * (lo + hi);
}

// LU with partial pivoting of T - λI (T tridiagonal, zero diagonal, off-diagonal e): L unit
// lower bidiagonal with multipliers l, U upper with diagonals d, u1, u2; swap[i] says rows i
// and i+1 were exchanged (LAPACK dlagtf's layout). Zero pivots become `tiny`.
struct TriLu {
  Vec d, u1, u2, l;
  Eigen::Matrix<unsigned char, Eigen::Dynamic, 1> swap;
};

void factor(const Vec& e, double lambda, double tiny, TriLu& f) {
  const Index n = e.size() + 1;
  f.d.resize(n);
  f.u1.setZero(n);
  f.u2.setZero(n);
  f.l.setZero(n);
  f.swap.setZero(n);
  double di = -lambda, ui = n > 1 ? e(0) : 0.0;
  for (Index i = 0; i + 1 < n; ++i) {
    const double below = e(i), next_u = i + 2 < n ? e(i + 1) : 0.0;
    if (std::fabs(di) >= std::fabs(below)) {
      if (di == 0) di = tiny;
      const double m = below / di;
      f.d(i) = di;
      f.u1(i) = ui;
      f.l(i) = m;
      di = -lambda - m * ui;
      ui = next_u;
    } else {
      const double m = di / below;
      f.d(i) = below;
      f.u1(i) = -lambda;
      f.u2(i) = next_u;
      f.l(i) = m;
      f.swap(i) = 1;
      di = ui + m * lambda;
      ui = -m * next_u;
    }
  }
  if (di == 0) di = tiny;
  f.d(n - 1) = di;
}

void solve(const TriLu& f, Vec& x) {
  const Index n = x.size();
  for (Index i = 0; i + 1 < n; ++i) {
    if (f.swap(i)) {
      const double t = x(i);
      x(i) = x(i + 1);
      x(i + 1) = t;
    }
    x(i + 1) -= f.l(i) * x(i);
  }
  x(n - 1) /= f.d(n - 1);
  if (n > 1) x(n - 2) = (x(n - 2) - f.u1(n - 2) * x(n - 1)) / f.d(n - 2);
  for (Index i = n - 3; i >= 0; --i) {
    x(i) = (x(i) - f.u1(i) * x(i + 1) - f.u2(i) * x(i + 2)) / f.d(i);
  }
}

// ‖T·x − λ·x‖∞ for the zero-diagonal tridiagonal T.
double residual(const Vec& e, const Vec& x, double lambda) {
  const Index n = x.size();
  double r = 0;
  for (Index i = 0; i < n; ++i) {
    double t = -lambda * x(i);
    if (i > 0) t += e(i - 1) * x(i - 1);
    if (i + 1 < n) t += e(i) * x(i + 1);
    r = max_of(r, std::fabs(t));
  }
  return r;
}

// The k leading singular triplets of the square matrix c (see step 3 above). Returns false,
// leaving the outputs unspecified, when a check fails; the caller then takes the full SVD.
bool leading_triplets(const Mat& c, Index k, Vec& sigma, Mat& uc, Mat& vc) {
  const Index n = c.cols();
  Eigen::internal::UpperBidiagonalization<Mat> bd(c);
  auto& band = const_cast<typename Eigen::internal::UpperBidiagonalization<Mat>::BidiagonalType&>(
      bd.bidiagonal());
  const Index nt = 2 * n;
  Vec e(nt - 1);
  for (Index i = 0; i < n; ++i) {
    e(2 * i) = band.diagonal()(i);
    if (i + 1 < n) e(2 * i + 1) = band.template diagonal<1>()(i);
  }
  double tnorm = 0, emax2 = 0;
  for (Index i = 0; i < nt; ++i) {
    const double left = i > 0 ? std::fabs(e(i - 1)) : 0.0;
    const double right = i + 1 < nt ? std::fabs(e(i)) : 0.0;
    tnorm = max_of(tnorm, left + right);
  }
  for (Index i = 0; i + 1 < nt; ++i) emax2 = max_of(emax2, e(i) * e(i));
  if (!(tnorm > 0) || !std::isfinite(tnorm)) return false;
  const double eps = 2.220446049250313e-16;
  const double pivmin = 2.2250738585072014e-308 * max_of(1.0, emax2);

  sigma.resize(k);
  for (Index j = 0; j < k; ++j) sigma(j) = bisect(e, nt - 1 - j, tnorm, pivmin);
  // A kept σ at rounding level: its vectors are not determined by T; the full SVD handles it.
  if (!(sigma(k - 1) > 8.0 * static_cast<double>(nt) * eps * tnorm)) return false;

  Mat x(nt, k);
  TriLu f;
  Vec v(nt);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  const double accept = 1e-10 * tnorm;
  for (Index j = 0; j < k; ++j) {
    factor(e, sigma(j), eps * tnorm, f);
    for (Index i = 0; i < nt; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      v(i) = static_cast<double>(state >> 11) * (1.0 / 9007199254740992.0) - 0.5;
    }
    bool converged = false;
    for (int it = 0; it < 8 && !converged; ++it) {
      solve(f, v);
      for (int pass = 0; pass < 2; ++pass) {
        for (Index q = 0; q < j; ++q) v -= x.col(q).dot(v) * x.col(q);
      }
      const double norm = v.norm();
      if (!(norm > 0) || !std::isfinite(norm)) return false;
      v /= norm;
      converged = it >= 1 && residual(e, v, sigma(j)) <= accept;
    }
    if (!converged) return false;
    x.col(j) = v;
  }
  Mat ub(n, k), vb(n, k);
  for (Index j = 0; j < k; ++j) {
    for (Index i = 0; i < n; ++i) {
      vb(i, j) = x(2 * i, j);
      ub(i, j) = x(2 * i + 1, j);
    }
    const double nu = ub.col(j).norm(), nv = vb.col(j).norm();
    // Exact eigenvectors split evenly, 1/√2 each.
    if (!(nu > 0.5 && nv > 0.5)) return false;
    ub.col(j) /= nu;
    vb.col(j) /= nv;
  }
  const Mat id = Mat::Identity(k, k);
  if (!((ub.transpose() * ub - id).cwiseAbs().maxCoeff() <= 1e-9) ||
      !((vb.transpose() * vb - id).cwiseAbs().maxCoeff() <= 1e-9)) {
    return false;
  }
  bd.householderU().applyThisOnTheLeft(ub);
  bd.householderV().applyThisOnTheLeft(vb);
  uc = ub;
  vc = vb;
  return true;
}

}  // namespace
}  // namespace edgefuse::detail::EDGEFUSE_SVD_NS

namespace edgefuse::detail {

void EDGEFUSE_SVD_FN(FactoredSvdJob& job) {
  using namespace EDGEFUSE_SVD_NS;
  Eigen::initParallel();
  const auto out = static_cast<Index>(job.out), in = static_cast<Index>(job.in);
  const auto r_total = static_cast<Index>(job.total_rank), k = static_cast<Index>(job.k);
  Mat b_s(out, r_total), a_st(in, r_total);
  // In place: the QRs overwrite the stacks instead of copying them (2·(out + in)·R·8 bytes).
  using InPlaceQr = Eigen::HouseholderQR<Eigen::Ref<Mat>>;
  Owned<InPlaceQr> qr_b, qr_a;
  auto stack_and_factor = [&](int which) {
    Index at = 0;
    for (std::size_t p = 0; p < job.count; ++p) {
      const auto r = static_cast<Index>(job.ranks[p]);
      if (which == 0) {
        const float* src = job.b[p];
        const double c = job.coefficients[p];
        for (Index col = 0; col < r; ++col) {
          for (Index i = 0; i < out; ++i) b_s(i, at + col) = c * src[i * r + col];
        }
      } else {
        const float* src = job.a[p];
        for (Index row = 0; row < r; ++row) {
          for (Index i = 0; i < in; ++i) a_st(i, at + row) = src[row * in + i];
        }
      }
      at += r;
    }
    if (which == 0) {
      qr_b.p = new InPlaceQr(b_s);
    } else {
      qr_a.p = new InPlaceQr(a_st);
    }
  };
  run_both(stack_and_factor);
  const InPlaceQr& qb = *qr_b.p;
  const InPlaceQr& qa = *qr_a.p;

  const Index kb = min_of(out, r_total), ka = min_of(in, r_total);
  const Mat ra = qa.matrixQR().topRows(ka).triangularView<Eigen::Upper>();
  Mat core(kb, ka);
  {
    // Two fixed column halves, so the bits do not depend on the thread count.
    const Index half = ka / 2;
    auto product = [&](int which) {
      const Index c0 = which == 0 ? 0 : half, nc = which == 0 ? half : ka - half;
      if (nc == 0) return;
      core.middleCols(c0, nc).noalias() =
          qb.matrixQR().topLeftCorner(kb, r_total).triangularView<Eigen::Upper>() *
          ra.middleRows(c0, nc).transpose();
    };
    run_both(product);
  }

  Vec sigma;
  Mat uc, vc;
  job.partial = kb == ka && 16 * k <= kb && leading_triplets(core, k, sigma, uc, vc);
  if (!job.partial) {
    Eigen::BDCSVD<Mat> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
    sigma = svd.singularValues().head(k);
    uc = svd.matrixU().leftCols(k);
    vc = svd.matrixV().leftCols(k);
  }
  // Rotate back only the k kept vectors: Q·[U_c; 0].
  Mat uk = Mat::Zero(out, k), vk = Mat::Zero(in, k);
  uk.topRows(kb) = uc;
  vk.topRows(ka) = vc;
  auto rotate = [&](int which) {
    if (which == 0) {
      uk.applyOnTheLeft(qb.householderQ());
    } else {
      vk.applyOnTheLeft(qa.householderQ());
    }
  };
  run_both(rotate);
  for (Index j = 0; j < k; ++j) job.sigma[j] = sigma(j);
  for (Index i = 0; i < out; ++i) {
    for (Index j = 0; j < k; ++j) job.us[i * k + j] = static_cast<float>(uk(i, j) * sigma(j));
  }
  for (Index j = 0; j < k; ++j) {
    for (Index i = 0; i < in; ++i) job.vt[j * in + i] = static_cast<float>(vk(i, j));
  }
}

}  // namespace edgefuse::detail
