// The "server_optimizer", "aggregation" and "clip" objects of a job file
// (src/engine/job_rules.h).
#include "src/engine/job_rules.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/core/error.h"

namespace edgefuse::detail {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The keys `rule` takes besides "rule", "state" and "resume_state".
std::vector<std::string> parameter_keys(ServerRule rule) {
  switch (rule) {
    case ServerRule::kFedAvgM:
    case ServerRule::kNesterov:
      return {"lr", "momentum"};
    case ServerRule::kFedAdam:
      return {"lr", "beta1", "beta2", "tau", "bias_correction"};
    case ServerRule::kFedYogi:
    case ServerRule::kFedAdagrad:
      return {"lr", "beta1", "beta2", "tau"};
  }
  return {};
}

// Flower's defaults for the adaptive rules (FedYogi's server lr is 0.01), the published DiLoCo
// outer lr for Nesterov, plain server momentum for FedAvgM.
float default_lr(ServerRule rule) {
  switch (rule) {
    case ServerRule::kFedAvgM:
      return 1.0f;
    case ServerRule::kNesterov:
      return 0.7f;
    case ServerRule::kFedYogi:
      return 0.01f;
    case ServerRule::kFedAdam:
    case ServerRule::kFedAdagrad:
      return 0.1f;
  }
  return 1.0f;
}

// The keys of "ties", "dare_linear" and "dare_ties" (mergekit's parameters and defaults).
void parse_task_merge(const json& j, const std::string& where, const std::string& name,
                      TaskMergeAggregate& out) {
  TaskMergeOptions& o = out.options;
  if (j.contains("density")) {
    const json& d = j.at("density");
    if (!d.is_number() || !(d.get<double>() > 0.0 && d.get<double>() <= 1.0)) {
      fail(where, ": \"density\" must be a number in (0, 1], got ", d.dump());
    }
    o.density = d.get<double>();
  }
  for (const char* key : {"normalize", "rescale"}) {
    if (!j.contains(key)) continue;
    if (!j.at(key).is_boolean()) fail(where, ": \"", key, "\" must be true or false");
    (std::string(key) == "normalize" ? o.normalize : o.rescale) = j.at(key).get<bool>();
  }
  if (j.contains("majority_sign")) {
    const json& m = j.at("majority_sign");
    if (!m.is_string() || (m != "sum" && m != "count")) {
      fail(where, ": \"majority_sign\" must be \"sum\" or \"count\", got ", m.dump());
    }
    o.majority_sign = m == "sum" ? MajoritySign::kTotal : MajoritySign::kFrequency;
  }
  if (name != "ties") {
    if (j.contains("seed")) {
      const json& v = j.at("seed");
      if (!v.is_number_unsigned())
        fail(where, ": \"seed\" must be an integer >= 0, got ", v.dump());
      o.seed = v.get<std::uint64_t>();
    } else if (o.density < 1.0) {
      fail(where, ": rule ", name,
           " draws its masks: \"seed\" is required (the same seed gives the same masks)");
    }
  }
}

}  // namespace

ServerOptimizerJob parse_server_optimizer(const json& j, const std::string& label,
                                          const fs::path& base) {
  const std::string where = label + ": \"server_optimizer\"";
  if (!j.is_object())
    fail(where, " must be an object such as {\"rule\": \"fedadam\", \"lr\": 0.1}");
  if (!j.contains("rule") || !j.at("rule").is_string()) {
    fail(where, ": \"rule\" is required (fedavgm, fedadam, fedyogi, fedadagrad or nesterov)");
  }
  const auto rule = server_rule_from_name(j.at("rule").get<std::string>());
  if (!rule) {
    fail(where, ": unknown rule ", j.at("rule").dump(),
         " (expected fedavgm, fedadam, fedyogi, fedadagrad or nesterov)");
  }
  const std::vector<std::string> params = parameter_keys(*rule);
  std::set<std::string> known(params.begin(), params.end());
  known.insert({"rule", "state", "resume_state"});
  for (const auto& item : j.items()) {
    if (!known.count(item.key())) {
      std::string expected;
      for (const auto& k : params) expected += k + ", ";
      fail(where, ": unknown key '", item.key(), "' for rule ", server_rule_name(*rule),
           " (expected ", expected, "state, resume_state)");
    }
  }
  ServerOptimizerJob out;
  out.step.rule = *rule;
  out.step.lr = default_lr(*rule);
  // A finite number in the range `ok` accepts, stored as f32.
  auto number = [&](const char* key, float* dst, bool (*ok)(double), const char* range) {
    if (!j.contains(key)) return;
    const json& v = j.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()) || !ok(v.get<double>())) {
      fail(where, ": \"", key, "\" must be a finite number ", range, ", got ", v.dump());
    }
    *dst = v.get<float>();
  };
  auto positive = [](double x) { return x > 0; };
  auto unit = [](double x) { return x >= 0 && x < 1; };
  number("lr", &out.step.lr, positive, "> 0");
  number("momentum", &out.step.momentum, unit, "in [0, 1)");
  number("beta1", &out.step.beta1, unit, "in [0, 1)");
  number("beta2", &out.step.beta2, unit, "in [0, 1)");
  number("tau", &out.step.tau, positive, "> 0");
  if (!(out.step.lr > 0) || !(out.step.tau > 0)) {  // a positive double that rounds to f32 zero
    fail(where, ": \"lr\" and \"tau\" must stay above 0 in float precision");
  }
  for (const char* key : {"bias_correction", "resume_state"}) {
    if (j.contains(key) && !j.at(key).is_boolean())
      fail(where, ": \"", key, "\" must be true or false");
  }
  out.bias_correction = j.value("bias_correction", false);
  out.resume_state = j.value("resume_state", true);
  if (j.contains("state")) {
    const json& s = j.at("state");
    if (!s.is_string() || s.get<std::string>().empty()) {
      fail(where, ": \"state\" must be a non-empty folder path");
    }
    const fs::path p = s.get<std::string>();
    out.state = p.is_absolute() ? p : base / p;
  }
  return out;
}

AggregationJob parse_aggregation(const json& j, const std::string& label) {
  const std::string where = label + ": \"aggregation\"";
  const char* rules =
      "mean, median, trimmed_mean, krum, multi_krum, bulyan, centered_clip, ties, dare_linear "
      "or dare_ties";
  const json& rule = j.is_object() && j.contains("rule") ? j.at("rule") : j;
  if (!rule.is_string()) {
    fail(where, " must be a rule name (", rules, ") or an object {\"rule\": ..., ...}");
  }
  const std::string name = rule.get<std::string>();
  std::vector<std::string> keys{"rule"};
  AggregationJob out;
  if (name == "median") {
    out.robust = RobustAggregate{RobustRule::kMedian, 0.0};
    keys.emplace_back("weighted");
  } else if (name == "trimmed_mean") {
    out.robust = RobustAggregate{RobustRule::kTrimmedMean, 0.2};
    keys.emplace_back("beta");
  } else if (name == "krum" || name == "multi_krum" || name == "bulyan") {
    out.selection = ClientSelection{
        name == "bulyan" ? SelectionRule::kBulyan : SelectionRule::kMultiKrum, 0, 1};
    keys.emplace_back("f");
    if (name == "multi_krum") keys.emplace_back("m");
  } else if (name == "centered_clip") {
    out.centered_clip = CenteredClipOptions{};
    keys.insert(keys.end(), {"tau", "iterations"});
  } else if (name == "ties" || name == "dare_linear" || name == "dare_ties") {
    out.task_merge =
        TaskMergeAggregate{name == "ties"          ? TaskMergeMethod::kMergekitTies
                           : name == "dare_linear" ? TaskMergeMethod::kMergekitDareLinear
                                                   : TaskMergeMethod::kMergekitDareTies,
                           {}};
    keys.insert(keys.end(), {"density", "normalize", "rescale"});
    if (name != "dare_linear") keys.emplace_back("majority_sign");
    if (name != "ties") keys.emplace_back("seed");
  } else if (name != "mean") {
    fail(where, ": unknown rule \"", name, "\" (expected ", rules, ")");
  }
  if (out.centered_clip && (!j.is_object() || !j.contains("tau"))) {
    fail(where, ": centered_clip needs \"tau\", the clipping radius");
  }
  if (!j.is_object()) return out;
  for (const auto& item : j.items()) {
    if (std::find(keys.begin(), keys.end(), item.key()) == keys.end()) {
      std::string expected;
      for (const auto& k : keys) expected += (expected.empty() ? "" : ", ") + k;
      fail(where, ": unknown key '", item.key(), "' for rule ", name, " (expected ", expected, ")");
    }
  }
  if (j.contains("beta")) {
    const json& b = j.at("beta");
    if (!b.is_number() || !(b.get<double>() >= 0.0 && b.get<double>() < 0.5)) {
      fail(where, ": \"beta\" must be a number in [0, 0.5), got ", b.dump());
    }
    out.robust->beta = b.get<double>();
  }
  if (j.contains("weighted")) {
    if (!j.at("weighted").is_boolean()) fail(where, ": \"weighted\" must be true or false");
    out.robust->weighted = j.at("weighted").get<bool>();
  }
  const auto count = [&](const char* key, std::uint64_t least) {
    const json& v = j.at(key);
    if (!v.is_number_integer() ||
        (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0) ||
        v.get<std::uint64_t>() < least || v.get<std::uint64_t>() > 1000000) {
      fail(where, ": \"", key, "\" must be an integer in [", least, ", 1000000], got ", v.dump());
    }
    return static_cast<std::size_t>(v.get<std::uint64_t>());
  };
  if (j.contains("f")) out.selection->f = count("f", 0);
  if (j.contains("m")) out.selection->m = count("m", 1);
  if (out.task_merge) parse_task_merge(j, where, name, *out.task_merge);
  if (out.centered_clip) {
    const json& t = j.at("tau");
    if (!t.is_number() || !std::isfinite(t.get<double>()) || !(t.get<double>() > 0.0)) {
      fail(where, ": \"tau\" must be a finite number > 0, got ", t.dump());
    }
    out.centered_clip->tau = t.get<double>();
    if (j.contains("iterations")) out.centered_clip->iterations = count("iterations", 1);
  }
  return out;
}

ClipJob parse_clip(const json& j, const std::string& label, const fs::path& base) {
  const std::string where = label + ": \"clip\"";
  if (!j.is_object()) {
    fail(where, " must be an object such as {\"norm\": 1.0} or {\"adaptive\": {...}}");
  }
  const auto known = {"norm", "adaptive", "noise_multiplier", "seed", "state", "resume_state"};
  for (const auto& item : j.items()) {
    if (std::find(known.begin(), known.end(), item.key()) == known.end()) {
      fail(where, ": unknown key '", item.key(),
           "' (expected norm, adaptive, noise_multiplier, seed, state, resume_state)");
    }
  }
  if (j.contains("norm") == j.contains("adaptive")) {
    fail(where, ": give either \"norm\" (fixed clipping) or \"adaptive\"");
  }
  // A finite number in [lo, hi) (positive: > lo).
  const auto number = [](const json& o, const std::string& at, const char* key, double fallback,
                         double lo, bool positive) {
    if (!o.contains(key)) return fallback;
    const json& v = o.at(key);
    const double x = v.is_number() ? v.get<double>() : std::nan("");
    if (!std::isfinite(x) || (positive ? !(x > lo) : !(x >= lo))) {
      fail(at, ": \"", key, "\" must be a finite number ", positive ? "> " : ">= ", lo, ", got ",
           v.dump());
    }
    return x;
  };
  ClipJob out;
  if (j.contains("norm")) {
    out.norm = number(j, where, "norm", 0.0, 0.0, true);
  } else {
    const json& a = j.at("adaptive");
    const std::string at = where + ": \"adaptive\"";
    if (!a.is_object()) fail(at, " must be an object such as {\"initial\": 0.1}");
    const auto keys = {"initial", "quantile", "lr", "count_noise"};
    for (const auto& item : a.items()) {
      if (std::find(keys.begin(), keys.end(), item.key()) == keys.end()) {
        fail(at, ": unknown key '", item.key(), "' (expected initial, quantile, lr, count_noise)");
      }
    }
    out.adaptive = true;
    out.norm = number(a, at, "initial", 0.1, 0.0, true);
    out.quantile = number(a, at, "quantile", 0.5, 0.0, false);
    if (out.quantile > 1.0) fail(at, ": \"quantile\" must be in [0, 1], got ", out.quantile);
    out.lr = number(a, at, "lr", 0.2, 0.0, true);
    out.count_noise = number(a, at, "count_noise", 0.0, 0.0, false);
  }
  out.noise_multiplier = number(j, where, "noise_multiplier", 0.0, 0.0, false);
  if (j.contains("seed")) {
    if (!j.at("seed").is_number_unsigned()) {
      fail(where, ": \"seed\" must be an integer in [0, 2^64), got ", j.at("seed").dump());
    }
    out.seed = j.at("seed").get<std::uint64_t>();
  }
  if ((out.noise_multiplier > 0.0 || out.count_noise > 0.0) && !out.seed) {
    fail(where, ": \"seed\" is required with noise (a secret integer that keys it)");
  }
  if (j.contains("resume_state")) {
    if (!j.at("resume_state").is_boolean()) fail(where, ": \"resume_state\" must be true or false");
    out.resume_state = j.at("resume_state").get<bool>();
  }
  if (j.contains("state")) {
    const json& st = j.at("state");
    if (!st.is_string() || st.get<std::string>().empty()) {
      fail(where, ": \"state\" must be a non-empty folder path");
    }
    const fs::path p = st.get<std::string>();
    out.state = p.is_absolute() ? p : base / p;
  }
  return out;
}

}  // namespace edgefuse::detail
