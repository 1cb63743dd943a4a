// Task-tensor merging: PEFT merge_utils and mergekit GTA semantics (lora/task_merge.h).
#include "edgefuse/lora/task_merge.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "edgefuse/core/error.h"
#include "src/core/splitmix.h"
#include "src/lora/task_merge_rules.h"

namespace edgefuse {

using detail::fail;

namespace {

double sign_of(double x) { return x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0; }

using Spec = detail::TaskMergeSpec;

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
              {TaskMergeMethod::kMergekitDareTies, "mergekit_dare_ties"},
              {TaskMergeMethod::kMergekitBreadcrumbs, "mergekit_breadcrumbs"},
              {TaskMergeMethod::kMergekitBreadcrumbsTies, "mergekit_breadcrumbs_ties"},
              {TaskMergeMethod::kMergekitDella, "mergekit_della"},
              {TaskMergeMethod::kMergekitDellaLinear, "mergekit_della_linear"}};

// Indices 0..n-1 of x sorted by ascending |x|, ties toward the lower index.
std::vector<std::size_t> ascending_magnitude(const double* x, std::size_t n) {
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::size_t a, std::size_t b) { return std::fabs(x[a]) < std::fabs(x[b]); });
  return idx;
}

// mergekit's rescaled_masked_tensor with the L1 norm: v *= ‖original‖₁ / ‖v‖₁.
void rescale_l1(std::vector<double>& v, const float* original) {
  double l1 = 0, kept = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    l1 += std::fabs(double(original[i]));
    kept += std::fabs(v[i]);
  }
  const double f = detail::l1_rescale_factor(l1, kept);
  if (f != 1.0) {
    for (auto& e : v) e *= f;
  }
}

// x with all but its k largest |x| zeroed (ties toward the lower index).
std::vector<double> keep_top(const double* x, std::size_t n, std::size_t k) {
  std::vector<double> out(x, x + n);
  if (k >= n) return out;
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  auto before = [&](std::size_t a, std::size_t b) {
    const double fa = std::fabs(x[a]), fb = std::fabs(x[b]);
    return fa != fb ? fa > fb : a < b;
  };
  std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), before);
  for (std::size_t i = k; i < n; ++i) out[idx[i]] = 0.0;
  return out;
}

void check_finite_values(const char* fn, const float* x, std::size_t n, const char* what) {
  if (n != 0 && x == nullptr) fail(fn, ": ", what, " is null");
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) fail(fn, ": ", what, " holds a non-finite value at element ", i);
  }
}

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
  fail("unknown majority sign method '", name,
       "' (valid: total, frequency; mergekit's sum, count)");
}

std::vector<double> magnitude_prune(const double* x, std::size_t n, double density) {
  if (density >= 1.0) return std::vector<double>(x, x + n);
  return keep_top(x, n, static_cast<std::size_t>(std::floor(density * static_cast<double>(n))));
}

std::vector<std::uint8_t> dare_mask(std::size_t n, double density, std::uint64_t seed,
                                    std::string_view stream_key, std::size_t k) {
  const std::uint64_t s = detail::task_mask_stream(seed, stream_key, k);
  std::vector<std::uint8_t> m(n);
  for (std::size_t i = 0; i < n; ++i) m[i] = detail::task_uniform_draw(s, i) < density ? 1 : 0;
  return m;
}

std::vector<double> breadcrumbs_prune(const double* x, std::size_t n, double density,
                                      double gamma) {
  std::vector<double> out(x, x + n);
  if (density >= 1.0) return out;
  if (!(gamma >= 0.0 && gamma < 1.0)) fail("breadcrumbs: gamma = ", gamma, " is outside [0, 1)");
  const auto nd = static_cast<double>(n);
  auto n_top = static_cast<std::ptrdiff_t>(std::floor(gamma * nd));
  auto n_bot = static_cast<std::ptrdiff_t>(n) -
               static_cast<std::ptrdiff_t>(std::floor(density * nd)) - n_top;
  if (n_bot < 0) {
    n_top += n_bot;
    n_bot = 0;
  }
  const auto order = ascending_magnitude(x, n);
  for (std::ptrdiff_t i = 0; i < static_cast<std::ptrdiff_t>(n); ++i) {
    if (i < n_bot || i >= static_cast<std::ptrdiff_t>(n) - n_top)
      out[order[static_cast<std::size_t>(i)]] = 0.0;
  }
  return out;
}

std::vector<double> della_keep_probabilities(const double* x, std::size_t n, double density,
                                             double epsilon, std::size_t row_len) {
  if (!(density - epsilon > 0.0 && density + epsilon < 1.0)) {
    fail("della: density ± epsilon (", density, " ± ", epsilon, ") must lie in (0, 1)");
  }
  const std::size_t m = row_len == 0 ? n : row_len;
  if (m == 0 || n % m != 0) fail("della: rows of ", m, " do not divide ", n, " elements");
  std::vector<double> p(n, density);
  for (std::size_t r0 = 0; r0 < n; r0 += m) {
    if (m < 2) break;
    const auto order = ascending_magnitude(x + r0, m);
    for (std::size_t rank = 0; rank < m; ++rank) {
      p[r0 + order[rank]] = (density - epsilon) +
                            static_cast<double>(rank) / static_cast<double>(m - 1) * 2.0 * epsilon;
    }
  }
  return p;
}

std::vector<float> model_stock(const float* base, const std::vector<const float*>& models,
                               std::size_t n, std::size_t row_len) {
  const char* fn = "model_stock";
  const std::size_t N = models.size();
  if (N < 2) fail(fn, ": needs the base and at least 2 fine-tuned models, got ", N);
  check_finite_values(fn, base, n, "the base");
  for (std::size_t k = 0; k < N; ++k) {
    check_finite_values(fn, models[k], n, ("model " + std::to_string(k)).c_str());
  }
  const std::size_t m = row_len == 0 ? n : row_len;
  if (n != 0 && (m == 0 || n % m != 0))
    fail(fn, ": rows of ", m, " do not divide ", n, " elements");
  std::vector<float> out(n);
  for (std::size_t r0 = 0; r0 < n; r0 += m) {
    // Mean pairwise cosine of the task vectors over this row (or the whole tensor).
    double cos_sum = 0;
    std::size_t pairs = 0;
    for (std::size_t a = 0; a < N; ++a) {
      for (std::size_t b = a + 1; b < N; ++b) {
        double dot = 0, na = 0, nb = 0;
        for (std::size_t i = r0; i < r0 + m; ++i) {
          const double da = double(models[a][i]) - base[i], db = double(models[b][i]) - base[i];
          dot += da * db;
          na += da * da;
          nb += db * db;
        }
        cos_sum += std::clamp(dot / std::max(std::sqrt(na) * std::sqrt(nb), 1e-6), -1.0, 1.0);
        ++pairs;
      }
    }
    const double c = cos_sum / static_cast<double>(pairs);
    const double t = static_cast<double>(N) * c / (1.0 + static_cast<double>(N - 1) * c);
    for (std::size_t i = r0; i < r0 + m; ++i) {
      double mean = 0;
      for (std::size_t k = 0; k < N; ++k) mean += models[k][i];
      mean /= static_cast<double>(N);
      out[i] = static_cast<float>(t * mean + (1.0 - t) * base[i]);
    }
  }
  return out;
}

std::vector<float> slerp(const float* v0, const float* v1, std::size_t n, double t) {
  const char* fn = "slerp";
  if (!std::isfinite(t)) fail(fn, ": t = ", t, " is not finite");
  check_finite_values(fn, v0, n, "v0");
  check_finite_values(fn, v1, n, "v1");
  double n0 = 0, n1 = 0;
  for (std::size_t i = 0; i < n; ++i) {
    n0 += double(v0[i]) * v0[i];
    n1 += double(v1[i]) * v1[i];
  }
  n0 = std::sqrt(n0);
  n1 = std::sqrt(n1);
  const double e0 = n0 > 1e-8 ? n0 : 1.0, e1 = n1 > 1e-8 ? n1 : 1.0;  // mergekit's normalize(eps)
  double d = 0;
  for (std::size_t i = 0; i < n; ++i) d += (v0[i] / e0) * (v1[i] / e1);
  double c0 = 1.0 - t, c1 = t;
  if (std::fabs(d) <= 0.9995) {
    const double theta = std::acos(d), s = std::sin(theta);
    c0 = std::sin((1.0 - t) * theta) / s;
    c1 = std::sin(t * theta) / s;
  }
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(c0 * v0[i] + c1 * v1[i]);
  return out;
}

std::vector<float> merge_tasks(TaskMergeMethod method, const std::vector<const float*>& tensors,
                               std::size_t n, const std::vector<double>& weights,
                               const TaskMergeOptions& o) {
  const Spec sp = detail::task_merge_spec(method);
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
      if (!std::isfinite(v[i]))
        fail(fn, ": tensor ", k, " holds a non-finite value at element ", i);
    }
    if (sp.sparsify == Spec::kMagnitude) {
      v = keep_top(v.data(), n, detail::magnitude_keep_count(sp, o.density, n));
      if (sp.mergekit && o.rescale.value_or(false)) rescale_l1(v, tensors[k]);
    } else if (sp.sparsify == Spec::kBreadcrumbs) {
      v = breadcrumbs_prune(v.data(), n, o.density, o.gamma);
      if (o.rescale.value_or(false)) rescale_l1(v, tensors[k]);
    } else if (sp.sparsify == Spec::kDella) {
      if (o.density < 1.0) {
        const auto p = della_keep_probabilities(v.data(), n, o.density, o.epsilon, o.row_len);
        const std::uint64_t st = detail::task_mask_stream(o.seed, o.stream_key, k);
        for (std::size_t i = 0; i < n; ++i) {
          const bool keep =
              o.masks ? (*o.masks)[k][i] != 0 : detail::task_uniform_draw(st, i) < p[i];
          if (!keep) v[i] = 0.0;
        }
        if (o.rescale.value_or(true)) rescale_l1(v, tensors[k]);
      }
    } else if (sp.sparsify == Spec::kRandom) {
      const std::vector<std::uint8_t> drawn =
          o.masks ? std::vector<std::uint8_t>{} : dare_mask(n, o.density, o.seed, o.stream_key, k);
      const auto& mask = o.masks ? (*o.masks)[k] : drawn;
      for (std::size_t i = 0; i < n; ++i) {
        if (!mask[i]) v[i] = 0.0;
      }
      if (!sp.mergekit) {
        for (auto& e : v) e *= 1.0 / o.density;  // PEFT's rescale
      } else if (o.rescale.value_or(true)) {
        rescale_l1(v, tensors[k]);
      }
    }
    x[k] = std::move(v);
  }
  const bool normalize = o.normalize.value_or(sp.normalize_default);
  std::vector<float> out(n);
  std::vector<double> xi(K);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t k = 0; k < K; ++k) xi[k] = x[k][i];
    out[i] = static_cast<float>(
        detail::combine_task_element(sp, xi.data(), weights.data(), K, o.majority_sign, normalize));
  }
  return out;
}

namespace detail {

TaskMergeSpec task_merge_spec(TaskMergeMethod m) {
  switch (m) {
    case TaskMergeMethod::kTaskArithmetic:
      return {Spec::kNone, false, false, false};
    case TaskMergeMethod::kMagnitudePrune:
      return {Spec::kMagnitude, false, false, false};
    case TaskMergeMethod::kTies:
      return {Spec::kMagnitude, true, false, false};
    case TaskMergeMethod::kDareLinear:
      return {Spec::kRandom, false, false, false};
    case TaskMergeMethod::kDareTies:
      return {Spec::kRandom, true, false, false};
    case TaskMergeMethod::kMergekitLinear:
      return {Spec::kNone, false, true, true};
    case TaskMergeMethod::kMergekitTies:
      return {Spec::kMagnitude, true, true, true};
    case TaskMergeMethod::kMergekitDareLinear:
      return {Spec::kRandom, false, true, false};
    case TaskMergeMethod::kMergekitDareTies:
      return {Spec::kRandom, true, true, false};
    case TaskMergeMethod::kMergekitBreadcrumbs:
      return {Spec::kBreadcrumbs, false, true, false};
    case TaskMergeMethod::kMergekitBreadcrumbsTies:
      return {Spec::kBreadcrumbs, true, true, false};
    case TaskMergeMethod::kMergekitDella:
      return {Spec::kDella, true, true, true};
    case TaskMergeMethod::kMergekitDellaLinear:
      return {Spec::kDella, false, true, false};
  }
  fail("merge_tasks: unknown method ", static_cast<int>(m));
}

std::size_t magnitude_keep_count(const TaskMergeSpec& spec, double density, std::size_t n) {
  if (density >= 1.0) return n;
  const auto k = static_cast<std::size_t>(std::floor(density * static_cast<double>(n)));
  return spec.mergekit && n > 0 ? std::max<std::size_t>(k, 1) : k;
}

std::uint64_t task_mask_stream(std::uint64_t seed, std::string_view stream_key, std::size_t k) {
  return splitmix_finalize(stream_state(seed, stream_key) ^
                           (static_cast<std::uint64_t>(k) + 1) * kSplitMixGamma);
}

double task_uniform_draw(std::uint64_t stream, std::uint64_t i) {
  return static_cast<double>(splitmix_at(stream, i) >> 11) * 0x1.0p-53;
}

double l1_rescale_factor(double original_l1, double kept_l1) {
  return original_l1 < 1e-7 || kept_l1 < 1e-7 ? 1.0 : original_l1 / kept_l1;
}

double combine_task_element(const TaskMergeSpec& sp, const double* x, const double* w,
                            std::size_t K, MajoritySign majority_sign, bool normalize) {
  if (!sp.consensus) {
    double mixed = 0, wsum = 0;
    for (std::size_t k = 0; k < K; ++k) {
      mixed += w[k] * x[k];
      wsum += w[k];
    }
    return sp.mergekit && normalize ? mixed / (std::fabs(wsum) < 1e-8 ? 1.0 : wsum) : mixed;
  }
  // PEFT elects on the unweighted values, mergekit on the weighted ones.
  double vote = 0;
  for (std::size_t k = 0; k < K; ++k) {
    const double e = sp.mergekit ? w[k] * x[k] : x[k];
    vote += majority_sign == MajoritySign::kTotal ? e : sign_of(e);
  }
  const double elected = vote >= 0 ? 1.0 : -1.0;
  double mixed = 0, divisor = 0;
  for (std::size_t k = 0; k < K; ++k) {
    const double wx = w[k] * x[k];
    if (sign_of(sp.mergekit ? wx : x[k]) != elected) continue;
    mixed += wx;
    divisor += sp.mergekit ? w[k] : 1.0;
  }
  if (!sp.mergekit) return mixed / std::max(divisor, 1.0);
  return normalize ? mixed / (divisor == 0.0 ? 1.0 : divisor) : mixed;  // mergekit: 0 -> 1
}

}  // namespace detail
}  // namespace edgefuse
