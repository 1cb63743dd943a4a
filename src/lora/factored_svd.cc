// factored_svd (lora/combine.h): checks its arguments and runs the copy of
// factored_svd_body.h for the widest instruction set this CPU has (see factored_svd.h).
#define EDGEFUSE_SVD_NS baseline
#define EDGEFUSE_SVD_FN factored_svd_baseline
#include "src/lora/factored_svd_body.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/lora/combine.h"
#include "src/kernels/nonfinite.h"

namespace edgefuse {
namespace {

using SvdFn = void (*)(detail::FactoredSvdJob&);

struct Isa {
  const char* name;
  SvdFn fn;
};

// Widest last. __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 state.
std::vector<Isa> supported_isas() {
  std::vector<Isa> isas{{"baseline", &detail::factored_svd_baseline}};
#if defined(EDGEFUSE_SVD_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) isas.push_back({"avx2", &detail::factored_svd_avx2});
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    isas.push_back({"avx512", &detail::factored_svd_avx512});
  }
#endif
  return isas;
}

LowRankSvd run_factored_svd(SvdFn fn, const std::vector<const Tensor*>& bs,
                            const std::vector<const Tensor*>& as,
                            const std::vector<double>& coefficients, std::uint64_t rank) {
  if (bs.empty() || bs.size() != as.size() || coefficients.size() != bs.size()) {
    detail::fail("factored_svd: ", bs.size(), " B factors, ", as.size(), " A factors and ",
                 coefficients.size(), " coefficients");
  }
  if (rank == 0) detail::fail("factored_svd: rank must be at least 1");
  for (std::size_t k = 0; k < bs.size(); ++k) {
    if (bs[k] == nullptr || as[k] == nullptr) detail::fail("factored_svd: pair ", k, " is null");
    if (bs[k]->dtype() != DType::kF32 || as[k]->dtype() != DType::kF32) {
      detail::fail("factored_svd: pair ", k, " is ", dtype_name(bs[k]->dtype()), "/",
                   dtype_name(as[k]->dtype()), "; B and A must be F32");
    }
  }
  const std::uint64_t out = bs[0]->shape().rank() == 2 ? bs[0]->shape()[0] : 0;
  const std::uint64_t in = as[0]->shape().rank() == 2 ? as[0]->shape()[1] : 0;
  std::vector<const float*> b, a;
  std::vector<std::uint64_t> ranks;
  std::uint64_t total = 0;
  for (std::size_t k = 0; k < bs.size(); ++k) {
    const Shape& sb = bs[k]->shape();
    const Shape& sa = as[k]->shape();
    if (sb.rank() != 2 || sa.rank() != 2 || sb[0] != out || sa[1] != in || sb[1] != sa[0] ||
        sb[1] == 0 || out == 0 || in == 0) {
      detail::fail("factored_svd: pair ", k, " (B ", sb.to_string(), ", A ", sa.to_string(),
                   ") does not fit ", out, "x", in);
    }
    if (!std::isfinite(coefficients[k])) {
      detail::fail("factored_svd: coefficient ", k, " = ", coefficients[k], " is not finite");
    }
    for (const auto& [what, t] :
         {std::pair<const char*, const Tensor*>{"B", bs[k]}, {"A", as[k]}}) {
      const std::size_t bad = detail::first_nonfinite(t->view());
      if (bad != detail::kNoIndex) {
        const std::uint64_t cols = t->shape()[1];
        detail::fail("factored_svd: ", what, " of pair ", k, " has the non-finite value ",
                     t->view().data_as<float>()[bad], " at [", bad / cols, ", ", bad % cols, "]");
      }
    }
    b.push_back(bs[k]->view().data_as<float>());
    a.push_back(as[k]->view().data_as<float>());
    ranks.push_back(sb[1]);
    total += sb[1];
  }
  const std::uint64_t k = std::min({rank, total, out, in});
  LowRankSvd s;
  s.sigma.assign(k, 0.0);
  s.us = Tensor::empty(DType::kF32, Shape{out, k});
  s.vt = Tensor::empty(DType::kF32, Shape{k, in});
  detail::FactoredSvdJob job;
  job.count = bs.size();
  job.b = b.data();
  job.a = a.data();
  job.ranks = ranks.data();
  job.coefficients = coefficients.data();
  job.out = out;
  job.in = in;
  job.total_rank = total;
  job.k = k;
  job.sigma = s.sigma.data();
  job.us = s.us.view().data_as<float>();
  job.vt = s.vt.view().data_as<float>();
  fn(job);
  s.partial = job.partial;
  return s;
}

}  // namespace

LowRankSvd factored_svd(const std::vector<const Tensor*>& bs, const std::vector<const Tensor*>& as,
                        const std::vector<double>& coefficients, std::uint64_t rank) {
  static const SvdFn best = supported_isas().back().fn;
  return run_factored_svd(best, bs, as, coefficients, rank);
}

namespace detail {

std::vector<std::string> factored_svd_isas() {
  std::vector<std::string> names;
  for (const Isa& i : supported_isas()) names.emplace_back(i.name);
  return names;
}

LowRankSvd factored_svd_on(std::string_view isa, const std::vector<const Tensor*>& bs,
                           const std::vector<const Tensor*>& as,
                           const std::vector<double>& coefficients, std::uint64_t rank) {
  std::string names;
  for (const Isa& i : supported_isas()) {
    if (isa == i.name) return run_factored_svd(i.fn, bs, as, coefficients, rank);
    names += names.empty() ? "" : ", ";
    names += i.name;
  }
  fail("factored_svd_on: no copy for instruction set '", isa, "' on this CPU (", names, ")");
}

}  // namespace detail
}  // namespace edgefuse
