// The factored truncated SVD behind combine.h's factored_svd, split by instruction set.
//
// factored_svd_body.h holds the algorithm (QR of the stacked factors, core product, leading
// triplets of the core, rotation back) and is compiled once per instruction set: baseline
// x86-64 or the build machine's default, AVX2+FMA and AVX-512 (x86-64 builds only). Each copy
// sees Eigen under its own namespace name (the AVX builds compile with -DEigen=...), so no Eigen
// template compiled for AVX can stand in for the baseline one at link time; the
// `factored_svd.isa_symbols` test checks that with nm. Only the plain struct below crosses the
// boundary: no Eigen or standard-library template.
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefuse::detail {

struct FactoredSvdJob {
  std::size_t count = 0;                 // number of (B_k, A_k) pairs
  const float* const* b = nullptr;       // B_k, row-major out × ranks[k]
  const float* const* a = nullptr;       // A_k, row-major ranks[k] × in
  const std::uint64_t* ranks = nullptr;  // r_k
  const double* coefficients = nullptr;  // c_k
  std::uint64_t out = 0, in = 0;
  std::uint64_t total_rank = 0;  // R = Σ r_k
  std::uint64_t k = 0;           // triplets kept: min(rank, R, out, in) >= 1
  double* sigma = nullptr;       // k values, descending
  float* us = nullptr;           // row-major out × k: U_k·diag(σ_k)
  float* vt = nullptr;           // row-major k × in: V_kᵀ
  bool partial = false;          // set: only the leading k triplets were computed
};

void factored_svd_baseline(FactoredSvdJob& job);
#if defined(EDGEFUSE_SVD_X86)
void factored_svd_avx2(FactoredSvdJob& job);
void factored_svd_avx512(FactoredSvdJob& job);
#endif

}  // namespace edgefuse::detail
