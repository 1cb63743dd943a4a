// Task-tensor merging: PEFT merge_utils and mergekit GTA semantics (lora/task_merge.h).
#include "edgefuse/lora/task_merge.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "edgefuse/core/error.h"
#include "src/core/splitmix.h"

namespace edgefuse {

using detail::fail;

namespace {

double sign_of(double x) { return x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0; }

struct Spec {
  enum Sparsify { kNone, kMagnitude, kRandom } sparsify;
  bool consensus;       // sign election
  bool mergekit;        // weighted election, weight-sum divisor, L1 rescale
  bool normalize_default;
};

Spec spec_of(TaskMergeMethod m) {
  switch (m) {
    case TaskMergeMethod::kTaskArithmetic: return {Spec::kNone, false, false, false};
    case TaskMergeMethod::kMagnitudePrune: return {Spec::kMagnitude, false, false, false};
    case TaskMergeMethod::kTies: return {Spec::kMagnitude, true, false, false};
    case TaskMergeMethod::kDareLinear: return {Spec::kRandom, false, false, false};
    case TaskMergeMethod::kDareTies: return {Spec::kRandom, true, false, false};
    case TaskMergeMethod::kMergekitLinear: return {Spec::kNone, false, true, true};
    case TaskMergeMethod::kMergekitTies: return {Spec::kMagnitude, true, true, true};
    case TaskMergeMethod::kMergekitDareLinear: return {Spec::kRandom, false, true, false};
    case TaskMergeMethod::kMergekitDareTies: return {Spec::kRandom, true, true, false};
  }
  fail("merge_tasks: unknown method ", static_cast<int>(m));
}

constexpr struct {
  TaskMergeMethod method;
  const char* name;
} kNames[] = {{TaskMergeMethod::kTaskArithmetic, "task_arithmetic"},
              {TaskMergeMethod::kMagnitudePrune, "magnitude_prune"},
              {TaskMergeMethod::kTies, "ties"},
              {TaskMergeMethod::kDareLinear, "dare_linear"},
              {TaskMergeMethod::kDareTies, "dare_ties"},
              {TaskMergeMethod::kMergekitLinear, "mergekit_linear"},
              {TaskMergeMethod::kMergekitTies, "mergekit_ties"},
              {TaskMergeMethod::kMergekitDareLinear, "mergekit_dare_linear"},
              {TaskMergeMethod::kMergekitDareTies, "mergekit_dare_ties"}};

}  // namespace

TaskMergeMethod parse_task_merge_method(std::string_view name) {
  std::string valid;
  for (const auto& n : kNames) {
    if (name == n.name) return n.method;
    valid += valid.empty() ? "" : ", ";
    valid += n.name;
  }
  fail("unknown task merge method '", name, "' (valid: ", valid, ")");
}

const char* task_merge_method_name(TaskMergeMethod m) {
  for (const auto& n : kNames) {
    if (n.method == m) return n.name;
  }
  return "?";
}

MajoritySign parse_majority_sign(std::string_view name) {
  if (name == "total" || name == "sum") return MajoritySign::kTotal;
  if (name == "frequency" || name == "count") return MajoritySign::kFrequency;
  fail("unknown majority sign method '", name, "' (valid: total, frequency; mergekit's sum, count)");
}

std::vector<double> magnitude_prune(const double* x, std::size_t n, double density) {
  std::vector<double> out(x, x + n);
  if (density >= 1.0) return out;
  const auto k = static_cast<std::size_t>(std::floor(density * static_cast<double>(n)));
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  auto before = [&](std::size_t a, std::size_t b) {
    const double fa = std::fabs(x[a]), fb = std::fabs(x[b]);
    return fa != fb ? fa > fb : a < b;
  };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), before);
  for (std::size_t i = k; i < n; ++i) out[idx[i]] = 0.0;
  return out;
}

std::vector<std::uint8_t> dare_mask(std::size_t n, double density, std::uint64_t seed,
                                    std::string_view stream_key, std::size_t k) {
  const std::uint64_t s = detail::splitmix_finalize(
      detail::stream_state(seed, stream_key) ^ (static_cast<std::uint64_t>(k) + 1) * detail::kSplitMixGamma);
  std::vector<std::uint8_t> m(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double u = static_cast<double>(detail::splitmix_at(s, i) >> 11) * 0x1.0p-53;
    m[i] = u < density ? 1 : 0;
  }
  return m;
}

std::vector<float> merge_tasks(TaskMergeMethod method, const std::vector<const float*>& tensors,
                               std::size_t n, const std::vector<double>& weights,
                               const TaskMergeOptions& o) {
  const Spec sp = spec_of(method);
  const std::size_t K = tensors.size();
  const char* fn = task_merge_method_name(method);
  if (K == 0) fail(fn, ": no tensors to merge");
  if (weights.size() != K) fail(fn, ": ", weights.size(), " weights for ", K, " tensors");
  for (std::size_t k = 0; k < K; ++k) {
    if (!std::isfinite(weights[k])) fail(fn, ": weight ", k, " = ", weights[k], " is not finite");
    if (n != 0 && tensors[k] == nullptr) fail(fn, ": tensor ", k, " is null");
  }
  if (!(o.density > 0.0 && o.density <= 1.0)) {
    fail(fn, ": density = ", o.density, " is outside (0, 1]");
  }
  if (o.masks != nullptr) {
    if (o.masks->size() != K) fail(fn, ": ", o.masks->size(), " DARE masks for ", K, " tensors");
    for (const auto& m : *o.masks) {
      if (m.size() != n) fail(fn, ": a DARE mask has ", m.size(), " entries for ", n, " elements");
    }
  }
  // Sparsified task tensors, in double.
  std::vector<std::vector<double>> x(K);
  for (std::size_t k = 0; k < K; ++k) {
    std::vector<double> v(n);
    for (std::size_t i = 0; i < n; ++i) {
      v[i] = tensors[k][i];
      if (!std::isfinite(v[i])) fail(fn, ": tensor ", k, " holds a non-finite value at element ", i);
    }
    if (sp.sparsify == Spec::kMagnitude) {
      v = magnitude_prune(v.data(), n, o.density);
    } else if (sp.sparsify == Spec::kRandom) {
      const std::vector<std::uint8_t> drawn =
          o.masks ? std::vector<std::uint8_t>{} : dare_mask(n, o.density, o.seed, o.stream_key, k);
      const auto& mask = o.masks ? (*o.masks)[k] : drawn;
      double l1 = 0, kept_l1 = 0;
      for (std::size_t i = 0; i < n; ++i) {
        l1 += std::fabs(v[i]);
        if (!mask[i]) v[i] = 0.0;
        kept_l1 += std::fabs(v[i]);
      }
      double factor = 1.0 / o.density;  // PEFT's rescale
      if (sp.mergekit) factor = (l1 >= 1e-7 && kept_l1 >= 1e-7) ? l1 / kept_l1 : 1.0;
      for (auto& e : v) e *= factor;
    }
    x[k] = std::move(v);
  }
  const bool normalize = o.normalize.value_or(sp.normalize_default);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    double result;
    if (!sp.consensus) {
      double mixed = 0, wsum = 0;
      for (std::size_t k = 0; k < K; ++k) {
        mixed += weights[k] * x[k][i];
        wsum += weights[k];
      }
      if (sp.mergekit && normalize) result = mixed / (std::fabs(wsum) < 1e-8 ? 1.0 : wsum);
      else result = mixed;
    } else {
      // PEFT elects on the unweighted tensors, mergekit on the weighted ones.
      double vote = 0;
      for (std::size_t k = 0; k < K; ++k) {
        const double e = sp.mergekit ? weights[k] * x[k][i] : x[k][i];
        vote += o.majority_sign == MajoritySign::kTotal ? e : sign_of(e);
      }
      const double elected = vote >= 0 ? 1.0 : -1.0;
      double mixed = 0, divisor = 0;
      for (std::size_t k = 0; k < K; ++k) {
        const double wx = weights[k] * x[k][i];
        const double s = sign_of(sp.mergekit ? wx : x[k][i]);
        if (s != elected) continue;
        mixed += wx;
        divisor += sp.mergekit ? weights[k] : 1.0;
      }
      if (!sp.mergekit) {
        result = mixed / std::max(divisor, 1.0);
      } else {
        result = normalize ? mixed / (std::fabs(divisor) < 1e-8 ? 1.0 : divisor) : mixed;
      }
    }
    out[i] = static_cast<float>(result);
  }
  return out;
}

}  // namespace edgefuse
