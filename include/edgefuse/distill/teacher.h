// edgefuse/distill/teacher.h — many clients' outputs on the proxy set aggregated into one
// teacher distribution per row, for distilling the target (distill/loss.h).
//
// Rules (golden values in tests/distill_test.cc), each weighted
// further by per-client weights c_k:
//   mean_logits       t = Σ c_k z_k                                  FedMD, FedDF avg_logits
//   mean_probs        p = Σ c_k softmax(z_k / T)                     FedDF avg_probs (avg_losses
//                                                                    has the same gradient)
//   entropy_exp       per row w_k ∝ c_k exp(-H_k), H_k the entropy of softmax(z_k / T)
//   entropy_inv       per row w_k ∝ c_k / H_k (all weight to the H_k = 0 rows' clients if any)
//   confidence        per row w_k ∝ c_k max_i softmax(z_k / T)_i
//   fedet_variance    per row w_k ∝ c_k Var_i softmax(z_k / T)_i     FedET (paper)
//   fedet_log_variance  per row w_k ∝ c_k Var_i log_softmax(z_k / T)_i  (FedET reimplementation)
// and p = Σ w_k softmax(z_k / T) for the weighted rules. Probability rules may then be
// sharpened (DS-FL's entropy reduction):
//   era         p <- softmax(p / T_era)          (T_era = 0.1 in DS-FL)
//   era_power   p <- p^β / Σ p^β                 ("enhanced ERA", β = 2)
//
// Top-k signals (distill/signals.h) aggregate with mean_probs only (the other rules need the
// whole row): each client's k entries become probabilities as the target's top-k mode says
// — renormalised over the client's k (renormalize, subset), or exact from
// log-probabilities or logits + log-sum-exp (tail_bin, truncated) — and the target lists, per
// row, the union of the clients' ids with the weighted mean probability (a client lacking an id
// contributes 0 to it).
//
// Invalid signals (distill/signals.h validate_signal, or rows/vocabulary that disagree with
// the first client) are an error, or, when `rejected` is given, are left out and reported
// while the others are aggregated; no valid signal at all is always an error.
//
//   edgefuse::TeacherOptions o;
//   o.rule = edgefuse::TeacherRule::kMeanProbs;
//   o.temperature = 2;
//   edgefuse::TeacherTarget t = edgefuse::aggregate_teachers({{&a, 1.0}, {&b, 1.0}}, o);
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/distill/signals.h"

namespace edgefuse {

enum class TeacherRule : std::uint8_t {
  kMeanLogits,
  kMeanProbs,
  kEntropyExp,
  kEntropyInv,
  kConfidence,
  kFedETVariance,
  kFedETLogVariance,
};

enum class Sharpen : std::uint8_t { kNone, kEra, kEraPower };

// How a loss treats a top-k teacher (cases a-d below). Case (e), reverse KL on the
// student's own top-k, needs teacher log-probabilities at ids the client did not send, so a
// stored top-k signal cannot feed it.
enum class TopKMode : std::uint8_t {
  kRenormalize,  // (a) teacher renormalised over its ids, against the full student softmax
  kSubset,       // (b) teacher and student both renormalised over the teacher's ids
  kTailBin,      // (c) exact teacher probabilities on the ids plus one tail bin for the rest
  kTruncated,    // (d) Σ over the ids of p log(p/q) only; can be negative
};

// Names: "mean_logits", "mean_probs", "entropy_exp", "entropy_inv", "confidence",
// "fedet_variance", "fedet_log_variance"; "none", "era", "era_power"; "renormalize",
// "subset", "tail_bin", "truncated". parse_* throw Error listing the valid names.
std::string_view teacher_rule_name(TeacherRule rule) noexcept;
TeacherRule parse_teacher_rule(std::string_view name);
std::string_view sharpen_name(Sharpen sharpen) noexcept;
Sharpen parse_sharpen(std::string_view name);
std::string_view topk_mode_name(TopKMode mode) noexcept;
TopKMode parse_topk_mode(std::string_view name);

struct TeacherOptions {
  TeacherRule rule = TeacherRule::kMeanProbs;
  double temperature = 1.0;  // T of the softmaxes; the loss must use the same T
  Sharpen sharpen = Sharpen::kNone;
  double era_temperature = 0.1;
  double era_power = 2.0;
  TopKMode topk_mode = TopKMode::kRenormalize;  // for top-k signals
};

struct WeightedSignal {
  const TeacherSignal* signal = nullptr;
  double weight = 1.0;  // finite, >= 0; normalised over the accepted clients
};

struct RejectedSignal {
  std::string client;
  std::string reason;
};

// The aggregated teacher for rows [0, rows) of the proxy set.
struct TeacherTarget {
  enum class Kind : std::uint8_t {
    kLogits,  // values: rows x vocab logits; the loss applies its temperature
    kProbs,   // values: rows x vocab probabilities at `temperature`
    kTopK,    // ids/values: rows x k, values = log-probabilities at `temperature`, id -1 = unused
  };
  Kind kind = Kind::kLogits;
  std::size_t rows = 0;
  std::size_t vocab = 0;
  std::size_t k = 0;
  double temperature = 1.0;
  TopKMode topk_mode = TopKMode::kRenormalize;
  std::vector<float> values;
  std::vector<std::int32_t> ids;
  std::vector<std::string> clients;  // the clients aggregated, in input order
};

// Aggregates the signals. Throws Error for bad options (T <= 0, a rule or sharpening the
// inputs cannot use, weights negative / non-finite / all zero) and for invalid signals unless
// `rejected` collects them.
TeacherTarget aggregate_teachers(const std::vector<WeightedSignal>& signals,
                                 const TeacherOptions& options,
                                 std::vector<RejectedSignal>* rejected = nullptr);

// A target from explicit dense teacher probabilities (rows x vocab, each row summing to 1
// within 1e-4) or logits, for callers that build teachers themselves. Validated.
TeacherTarget probs_target(std::size_t rows, std::size_t vocab, std::vector<float> probs,
                           double temperature);
TeacherTarget logits_target(std::size_t rows, std::size_t vocab, std::vector<float> logits);

// The target restricted to the given rows, in that order (a shuffled mini-batch). Throws
// Error for an index >= target.rows.
TeacherTarget select_rows(const TeacherTarget& target, const std::vector<std::size_t>& rows);

}  // namespace edgefuse
