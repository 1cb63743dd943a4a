// Teacher aggregation (distill/teacher.h): per row, in double precision, then rounded once.
#include "edgefuse/distill/teacher.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "edgefuse/core/error.h"

namespace edgefuse {
namespace {

constexpr std::array<std::string_view, 7> kRuleNames{
    "mean_logits", "mean_probs",     "entropy_exp",       "entropy_inv",
    "confidence",  "fedet_variance", "fedet_log_variance"};
constexpr std::array<std::string_view, 3> kSharpenNames{"none", "era", "era_power"};
constexpr std::array<std::string_view, 4> kTopKNames{"renormalize", "subset", "tail_bin",
                                                     "truncated"};

template <typename E, std::size_t N>
E parse_name(const char* what, const std::array<std::string_view, N>& names,
             std::string_view name) {
  for (std::size_t i = 0; i < N; ++i) {
    if (names[i] == name) return static_cast<E>(i);
  }
  std::string valid;
  for (std::size_t i = 0; i < N; ++i) valid += (i ? ", " : "") + std::string(names[i]);
  detail::fail("unknown ", what, " '", name, "' (valid: ", valid, ")");
}

void check_temperature(const char* fn, const char* name, double t) {
  if (!(t > 0.0) || !std::isfinite(t)) {
    detail::fail(fn, ": ", name, " = ", t, " must be a finite value > 0");
  }
}

// softmax(z / T) in double; returns log-sum-exp of z / T.
double softmax_row(const float* z, std::size_t n, double inv_t, double* p) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, double{z[i]} * inv_t);
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(double{z[i]} * inv_t - m));
  for (std::size_t i = 0; i < n; ++i) p[i] /= sum;
  return m + std::log(sum);
}

// Per-row weight factor of one client under `rule`, from its probabilities p and lse.
double rule_factor(TeacherRule rule, const float* z, const double* p, std::size_t n, double inv_t,
                   double lse) {
  switch (rule) {
    case TeacherRule::kEntropyExp:
    case TeacherRule::kEntropyInv: {
      double h = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        if (p[i] > 0.0) h -= p[i] * (double{z[i]} * inv_t - lse);
      }
      h = std::max(h, 0.0);
      return rule == TeacherRule::kEntropyExp ? std::exp(-h) : h;  // inv handled by caller
    }
    case TeacherRule::kConfidence:
      return *std::max_element(p, p + n);
    case TeacherRule::kFedETVariance:
    case TeacherRule::kFedETLogVariance: {
      if (n < 2) return 0.0;
      const bool logs = rule == TeacherRule::kFedETLogVariance;
      double mean = 0.0;
      for (std::size_t i = 0; i < n; ++i) mean += logs ? double{z[i]} * inv_t - lse : p[i];
      mean /= static_cast<double>(n);
      double ss = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        const double d = (logs ? double{z[i]} * inv_t - lse : p[i]) - mean;
        ss += d * d;
      }
      return ss / static_cast<double>(n - 1);
    }
    default:
      return 1.0;
  }
}

void sharpen_row(const TeacherOptions& o, double* p, std::size_t n) {
  if (o.sharpen == Sharpen::kEra) {
    const double inv = 1.0 / o.era_temperature;
    double m = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < n; ++i) m = std::max(m, p[i] * inv);
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] * inv - m));
    for (std::size_t i = 0; i < n; ++i) p[i] /= sum;
  } else if (o.sharpen == Sharpen::kEraPower) {
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) sum += (p[i] = std::pow(p[i], o.era_power));
    for (std::size_t i = 0; i < n; ++i) p[i] /= sum;
  }
}

struct Accepted {
  const TeacherSignal* signal;
  double weight;
};

TeacherTarget aggregate_dense(const std::vector<Accepted>& in, const TeacherOptions& o) {
  const std::size_t rows = in[0].signal->rows, vocab = in[0].signal->vocab, K = in.size();
  TeacherTarget t;
  t.rows = rows;
  t.vocab = vocab;
  t.temperature = o.temperature;
  t.kind = o.rule == TeacherRule::kMeanLogits ? TeacherTarget::Kind::kLogits
                                              : TeacherTarget::Kind::kProbs;
  t.values.resize(rows * vocab);
  const double inv_t = 1.0 / o.temperature;
  std::vector<double> probs(K * vocab), out(vocab), factor(K), w(K);
  for (std::size_t r = 0; r < rows; ++r) {
    if (o.rule == TeacherRule::kMeanLogits) {
      std::fill(out.begin(), out.end(), 0.0);
      for (std::size_t k = 0; k < K; ++k) {
        const float* z = in[k].signal->logits.data() + r * vocab;
        for (std::size_t i = 0; i < vocab; ++i) out[i] += in[k].weight * double{z[i]};
      }
    } else {
      bool any_zero_entropy = false;
      for (std::size_t k = 0; k < K; ++k) {
        const float* z = in[k].signal->logits.data() + r * vocab;
        double* p = probs.data() + k * vocab;
        const double lse = softmax_row(z, vocab, inv_t, p);
        factor[k] = rule_factor(o.rule, z, p, vocab, inv_t, lse);
        any_zero_entropy |= o.rule == TeacherRule::kEntropyInv && factor[k] == 0.0;
      }
      double total = 0.0;
      for (std::size_t k = 0; k < K; ++k) {
        double f = factor[k];
        if (o.rule == TeacherRule::kEntropyInv) {
          // w ∝ 1/H; a one-hot teacher (H = 0) takes all the weight, shared with its equals.
          f = any_zero_entropy ? (factor[k] == 0.0 ? 1.0 : 0.0) : 1.0 / factor[k];
        }
        w[k] = in[k].weight * f;
        total += w[k];
      }
      if (!(total > 0.0)) {
        // Every factor is 0 (e.g. uniform rows under a variance rule): fall back to the
        // client weights, which sum to 1.
        for (std::size_t k = 0; k < K; ++k) w[k] = in[k].weight;
        total = 1.0;
      }
      std::fill(out.begin(), out.end(), 0.0);
      for (std::size_t k = 0; k < K; ++k) {
        const double wk = w[k] / total;
        const double* p = probs.data() + k * vocab;
        for (std::size_t i = 0; i < vocab; ++i) out[i] += wk * p[i];
      }
      sharpen_row(o, out.data(), vocab);
    }
    float* dst = t.values.data() + r * vocab;
    for (std::size_t i = 0; i < vocab; ++i) dst[i] = static_cast<float>(out[i]);
  }
  return t;
}

TeacherTarget aggregate_topk(const std::vector<Accepted>& in, const TeacherOptions& o) {
  const std::size_t rows = in[0].signal->rows, vocab = in[0].signal->vocab;
  const bool exact = o.topk_mode == TopKMode::kTailBin || o.topk_mode == TopKMode::kTruncated;
  for (const Accepted& a : in) {
    const TeacherSignal& s = *a.signal;
    if (exact && !s.exact_probabilities()) {
      detail::fail("aggregate_teachers: top-k mode ", topk_mode_name(o.topk_mode),
                   " needs exact probabilities, but client '", s.client,
                   "' sent logits without logsumexp");
    }
    if (exact && s.temperature != o.temperature) {
      detail::fail("aggregate_teachers: client '", s.client, "' computed its ",
                   s.value_kind == TopKValues::kLogProbs ? "log-probabilities" : "logsumexp",
                   " at T = ", s.temperature, ", but the teacher is built at T = ", o.temperature,
                   " (top-k mode ", topk_mode_name(o.topk_mode), ")");
    }
  }
  const double inv_t = 1.0 / o.temperature;
  std::vector<std::vector<std::pair<std::int32_t, double>>> acc(rows);
  std::size_t width = 0;
  std::vector<double> lp;
  for (std::size_t r = 0; r < rows; ++r) {
    auto& row = acc[r];
    for (const Accepted& a : in) {
      const TeacherSignal& s = *a.signal;
      const float* v = s.values.data() + r * s.k;
      lp.resize(s.k);
      for (std::size_t j = 0; j < s.k; ++j) {
        if (s.value_kind == TopKValues::kLogProbs) {
          // log p at T_sig; exact mode needs T == T_sig, renormalised modes rescale z/T_sig.
          lp[j] = exact ? double{v[j]} : double{v[j]} * s.temperature * inv_t;
        } else {
          lp[j] = double{v[j]} * inv_t - (exact ? double{s.logsumexp[r]} : 0.0);
        }
      }
      if (!exact) {
        const double m = *std::max_element(lp.begin(), lp.end());
        double sum = 0.0;
        for (double x : lp) sum += std::exp(x - m);
        const double lse = m + std::log(sum);
        for (double& x : lp) x -= lse;
      }
      for (std::size_t j = 0; j < s.k; ++j) {
        row.emplace_back(s.ids[r * s.k + j], a.weight * std::exp(lp[j]));
      }
    }
    std::sort(row.begin(), row.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    // Merge equal ids, summing their contributions in client order (stable sort).
    std::size_t out = 0;
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (out > 0 && row[out - 1].first == row[i].first) {
        row[out - 1].second += row[i].second;
      } else {
        row[out++] = row[i];
      }
    }
    row.resize(out);
    width = std::max(width, out);
  }
  TeacherTarget t;
  t.kind = TeacherTarget::Kind::kTopK;
  t.rows = rows;
  t.vocab = vocab;
  t.k = width;
  t.temperature = o.temperature;
  t.topk_mode = o.topk_mode;
  t.ids.assign(rows * width, -1);
  t.values.assign(rows * width, -std::numeric_limits<float>::infinity());
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < acc[r].size(); ++j) {
      t.ids[r * width + j] = acc[r][j].first;
      t.values[r * width + j] = static_cast<float>(std::log(acc[r][j].second));
    }
  }
  return t;
}

}  // namespace

std::string_view teacher_rule_name(TeacherRule rule) noexcept {
  return kRuleNames[static_cast<std::size_t>(rule)];
}
TeacherRule parse_teacher_rule(std::string_view name) {
  return parse_name<TeacherRule>("teacher rule", kRuleNames, name);
}
std::string_view sharpen_name(Sharpen sharpen) noexcept {
  return kSharpenNames[static_cast<std::size_t>(sharpen)];
}
Sharpen parse_sharpen(std::string_view name) {
  return parse_name<Sharpen>("sharpening", kSharpenNames, name);
}
std::string_view topk_mode_name(TopKMode mode) noexcept {
  return kTopKNames[static_cast<std::size_t>(mode)];
}
TopKMode parse_topk_mode(std::string_view name) {
  return parse_name<TopKMode>("top-k mode", kTopKNames, name);
}

TeacherTarget aggregate_teachers(const std::vector<WeightedSignal>& signals,
                                 const TeacherOptions& o, std::vector<RejectedSignal>* rejected) {
  constexpr const char* kFn = "aggregate_teachers";
  check_temperature(kFn, "temperature", o.temperature);
  if (o.sharpen == Sharpen::kEra) check_temperature(kFn, "era_temperature", o.era_temperature);
  if (o.sharpen == Sharpen::kEraPower) check_temperature(kFn, "era_power", o.era_power);
  if (o.sharpen != Sharpen::kNone && o.rule == TeacherRule::kMeanLogits) {
    detail::fail(kFn, ": sharpening (", sharpen_name(o.sharpen),
                 ") applies to probability rules, not mean_logits");
  }
  if (signals.empty()) detail::fail(kFn, ": no teacher signals given");
  for (std::size_t i = 0; i < signals.size(); ++i) {
    if (signals[i].signal == nullptr) detail::fail(kFn, ": signals[", i, "] is null");
    const double w = signals[i].weight;
    if (!(w >= 0.0) || !std::isfinite(w)) {
      detail::fail(kFn, ": weight of client '", signals[i].signal->client, "' is ", w,
                   " (must be finite and >= 0)");
    }
  }
  std::vector<Accepted> accepted;
  std::vector<RejectedSignal> local_rejected;
  for (const WeightedSignal& ws : signals) {
    const TeacherSignal& s = *ws.signal;
    try {
      validate_signal(s);
      if (!accepted.empty()) {
        const TeacherSignal& first = *accepted.front().signal;
        if (s.vocab != first.vocab) {
          detail::fail("vocabulary size ", s.vocab, " differs from client '", first.client, "''s ",
                       first.vocab);
        }
        if (s.rows != first.rows) {
          detail::fail(s.rows, " rows differ from client '", first.client, "''s ", first.rows);
        }
        if (s.dense() != first.dense()) {
          detail::fail(s.dense() ? "dense" : "top-k", " signal mixed with ",
                       first.dense() ? "dense" : "top-k", " ones (client '", first.client, "')");
        }
      }
    } catch (const Error& e) {
      const std::string why = e.what();
      if (rejected == nullptr) {
        detail::fail(kFn, ": client '", s.client, "' rejected: ", why);
      }
      local_rejected.push_back({s.client, why});
      continue;
    }
    accepted.push_back({&s, ws.weight});
  }
  if (rejected != nullptr) *rejected = local_rejected;
  if (accepted.empty()) {
    detail::fail(kFn, ": no valid teacher signal (", local_rejected.size(),
                 " rejected; first: ", local_rejected.front().reason, ")");
  }
  double total = 0.0;
  for (const Accepted& a : accepted) total += a.weight;
  if (!(total > 0.0)) detail::fail(kFn, ": the accepted clients' weights sum to 0");
  for (Accepted& a : accepted) a.weight /= total;
  if (!accepted[0].signal->dense() && o.rule != TeacherRule::kMeanProbs) {
    detail::fail(kFn, ": rule ", teacher_rule_name(o.rule),
                 " needs dense logits; top-k signals aggregate with mean_probs");
  }
  TeacherTarget t =
      accepted[0].signal->dense() ? aggregate_dense(accepted, o) : aggregate_topk(accepted, o);
  for (const Accepted& a : accepted) t.clients.push_back(a.signal->client);
  return t;
}

TeacherTarget probs_target(std::size_t rows, std::size_t vocab, std::vector<float> probs,
                           double temperature) {
  constexpr const char* kFn = "probs_target";
  check_temperature(kFn, "temperature", temperature);
  if (rows == 0 || vocab == 0 || probs.size() != rows * vocab) {
    detail::fail(kFn, ": ", probs.size(), " values for rows x vocab = ", rows, " x ", vocab);
  }
  for (std::size_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (std::size_t i = 0; i < vocab; ++i) {
      const float p = probs[r * vocab + i];
      if (!(p >= 0.0f) || !std::isfinite(p)) {
        detail::fail(kFn, ": probability at row ", r, ", id ", i, " is ", p);
      }
      sum += p;
    }
    if (std::abs(sum - 1.0) > 1e-4) detail::fail(kFn, ": row ", r, " sums to ", sum, ", not 1");
  }
  TeacherTarget t;
  t.kind = TeacherTarget::Kind::kProbs;
  t.rows = rows;
  t.vocab = vocab;
  t.temperature = temperature;
  t.values = std::move(probs);
  return t;
}

TeacherTarget logits_target(std::size_t rows, std::size_t vocab, std::vector<float> logits) {
  TeacherSignal s = dense_signal("logits_target", rows, vocab, std::move(logits));
  TeacherTarget t;
  t.kind = TeacherTarget::Kind::kLogits;
  t.rows = rows;
  t.vocab = vocab;
  t.values = std::move(s.logits);
  return t;
}

TeacherTarget select_rows(const TeacherTarget& target, const std::vector<std::size_t>& rows) {
  TeacherTarget t;
  t.kind = target.kind;
  t.rows = rows.size();
  t.vocab = target.vocab;
  t.k = target.k;
  t.temperature = target.temperature;
  t.topk_mode = target.topk_mode;
  t.clients = target.clients;
  const std::size_t width = target.kind == TeacherTarget::Kind::kTopK ? target.k : target.vocab;
  t.values.resize(rows.size() * width);
  if (target.kind == TeacherTarget::Kind::kTopK) t.ids.resize(rows.size() * width);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] >= target.rows) {
      detail::fail("select_rows: row ", rows[i], " (index ", i, ") is beyond the target's ",
                   target.rows, " rows");
    }
    std::copy_n(target.values.begin() + static_cast<std::ptrdiff_t>(rows[i] * width), width,
                t.values.begin() + static_cast<std::ptrdiff_t>(i * width));
    if (!t.ids.empty()) {
      std::copy_n(target.ids.begin() + static_cast<std::ptrdiff_t>(rows[i] * width), width,
                  t.ids.begin() + static_cast<std::ptrdiff_t>(i * width));
    }
  }
  return t;
}

}  // namespace edgefuse
