// The fusion report as JSON, and a tensor's coverage in the resume journal (engine/fuse.h,
// src/engine/journal_notes.h).
#include "edgefuse/engine/fuse.h"

#include <cmath>

#include <nlohmann/json.hpp>

#include "src/engine/job_files.h"
#include "src/engine/journal_notes.h"
#include "src/io/io_util.h"
#include "src/lora/task_merge_rules.h"

namespace edgefuse {

using nlohmann::json;
namespace fs = std::filesystem;

const char* rejection_kind_name(RejectionKind kind) noexcept {
  switch (kind) {
    case RejectionKind::kDuplicateName:
      return "duplicate_name";
    case RejectionKind::kWeight:
      return "weight";
    case RejectionKind::kUnreadable:
      return "unreadable";
    case RejectionKind::kDuplicateFile:
      return "duplicate_file";
    case RejectionKind::kBadPlan:
      return "bad_plan";
    case RejectionKind::kBadUpdate:
      return "bad_update";
  }
  return "unknown";
}

namespace {

// The report's "aggregation": the rule and its parameters; with a client selection, each
// client's score (null for +inf) and whether it was fused; with centered clipping, each
// client's coefficient, last distance and factor.
json aggregation_json(const AggregationJob& a, const std::optional<ClientSelectionReport>& s,
                      const std::optional<CenteredClipResult>& cc) {
  json j;
  if (const auto& r = a.robust) {
    j["rule"] = r->rule == RobustRule::kMedian ? "median" : "trimmed_mean";
    if (r->rule == RobustRule::kTrimmedMean) j["beta"] = r->beta;
    if (r->weighted) j["weighted"] = true;
  } else if (const auto& c = a.selection) {
    j["rule"] = c->rule == SelectionRule::kBulyan ? "bulyan" : "multi_krum";
    j["f"] = c->f;
    if (c->rule == SelectionRule::kMultiKrum) j["m"] = c->m;
  } else if (const auto& c = a.centered_clip) {
    j["rule"] = "centered_clip";
    j["tau"] = c->tau;
    j["iterations"] = c->iterations;
  } else if (const auto& t = a.task_merge) {
    j["rule"] = t->method == TaskMergeMethod::kMergekitTies         ? "ties"
                : t->method == TaskMergeMethod::kMergekitDareLinear ? "dare_linear"
                                                                    : "dare_ties";
    j["density"] = t->options.density;
    if (t->method != TaskMergeMethod::kMergekitDareLinear) {
      j["majority_sign"] = t->options.majority_sign == MajoritySign::kTotal ? "sum" : "count";
    }
    if (t->method != TaskMergeMethod::kMergekitTies) j["seed"] = t->options.seed;
    const detail::TaskMergeSpec spec = detail::task_merge_spec(t->method);
    j["normalize"] = t->options.normalize.value_or(spec.normalize_default);
    j["rescale"] = t->options.rescale.value_or(spec.sparsify == detail::TaskMergeSpec::kRandom);
  } else {
    j["rule"] = "mean";
  }
  if (s) {
    j["clients"] = json::array();
    for (std::size_t i = 0; i < s->clients.size(); ++i) {
      j["clients"].push_back({{"name", s->clients[i]},
                              {"score", std::isfinite(s->scores[i]) ? json(s->scores[i]) : json()},
                              {"selected", static_cast<bool>(s->selected[i])}});
    }
  }
  if (cc) {
    j["clients"] = json::array();
    for (std::size_t i = 0; i < cc->labels.size(); ++i) {
      j["clients"].push_back({{"name", cc->labels[i]},
                              {"coefficient", cc->coefficients[i]},
                              {"distance", cc->distances[i]},
                              {"factor", cc->factors[i]}});
    }
  }
  return j;
}

}  // namespace

bool is_fusion_report(const fs::path& path) {
  try {
    const json j =
        json::parse(detail::read_small_file(path, detail::kMaxJobBytes, CheckpointRule::kIo));
    return j.is_object() && j.contains("output") && j.contains("tensors") && j.contains("accepted");
  } catch (const std::exception&) {
    return false;
  }
}

std::string fusion_report_json(const FusionReport& r) {
  json j;
  j["output"] = r.output.string();
  j["seconds"] = r.seconds;
  j["bytes_read"] = r.bytes_read;
  j["bytes_written"] = r.bytes_written;
  j["gb_per_s"] = r.bytes_per_second() / 1e9;
  j["triad_gb_per_s"] = r.triad_bytes_per_second / 1e9;
  j["triad_fraction"] = r.triad_fraction();
  j["threads"] = r.threads;
  j["memory_budget"] = r.memory_budget;
  j["tile_elements"] = r.tile_elements;
  j["client_state_bytes"] = r.client_state_bytes;
  j["resumed_tensors"] = r.resumed_tensors;
  j["resumed_bytes"] = r.resumed_bytes;
  j["accepted"] = r.accepted;
  j["rejected"] = json::array();
  for (const auto& x : r.rejected) {
    j["rejected"].push_back(
        {{"name", x.name}, {"kind", rejection_kind_name(x.kind)}, {"reason", x.reason}});
  }
  j["aggregation"] = aggregation_json(r.aggregation, r.selection, r.centered_clip);
  if (const auto& c = r.clip) {
    json clients = json::array();
    for (std::size_t i = 0; i < c->clients.size(); ++i) {
      clients.push_back(
          {{"name", c->clients[i]}, {"norm", c->norms[i]}, {"factor", c->factors[i]}});
    }
    j["clip"] = {
        {"rule", c->rule},
        {"norm", c->norm},
        {"next_norm", c->next_norm},
        {"round", c->round},
        {"noise_multiplier", c->noise_multiplier},
        {"unclipped", c->unclipped},
        {"unclipped_fraction", c->unclipped_fraction},
        {"state_from", c->state_from.empty() ? json(nullptr) : json(c->state_from.string())},
        {"clients", clients}};
  }
  if (const auto& o = r.server_optimizer) {
    j["server_optimizer"] = {
        {"rule", o->rule},
        {"lr", o->lr},
        {"lr_applied", o->lr_applied},
        {"step", o->step},
        {"state_from", o->state_from.empty() ? json(nullptr) : json(o->state_from.string())},
        {"state_tensors", o->state_tensors},
        {"state_bytes", o->state_bytes}};
  }
  j["tensors"] = json::array();
  for (const auto& c : r.coverage) {
    j["tensors"].push_back({{"name", c.name},
                            {"elements", c.elements},
                            {"covered", c.covered},
                            {"fraction", c.fraction()},
                            {"min_contributors", c.min_contributors},
                            {"max_contributors", c.max_contributors}});
  }
  return j.dump(2) + "\n";
}

namespace detail {

// A tensor's coverage as the note of its journal line, and back.
std::string coverage_note(const TensorCoverage& c) {
  return json{c.elements, c.covered, c.min_contributors, c.max_contributors}.dump();
}
TensorCoverage coverage_of_note(std::string_view name, std::string_view note) {
  TensorCoverage c;
  c.name = std::string(name);
  const json j = json::parse(note, nullptr, false);
  if (j.is_array() && j.size() == 4) {
    c.elements = j[0].get<std::uint64_t>();
    c.covered = j[1].get<std::uint64_t>();
    c.min_contributors = j[2].get<std::uint32_t>();
    c.max_contributors = j[3].get<std::uint32_t>();
  }
  return c;
}

}  // namespace detail
}  // namespace edgefuse
