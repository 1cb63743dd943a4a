// The clip state file of the job key "clip" (src/engine/clip_state_files.h).
#include "src/engine/clip_state_files.h"

#include <cmath>
#include <vector>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/clipping.h"
#include "edgefuse/core/error.h"
#include "src/engine/job_files.h"
#include "src/engine/lineage_id.h"
#include "src/io/io_util.h"

namespace edgefuse::detail {

using nlohmann::json;
namespace fs = std::filesystem;

std::optional<PreviousClipState> read_previous_clip_state(const ClipJob& clip,
                                                          const fs::path& target_folder,
                                                          const Checkpoint& target) {
  if (!clip.resume_state) return std::nullopt;
  const fs::path folder = clip.state.empty() ? target_folder : clip.state;
  PreviousClipState s;
  s.file = folder / kClipStateFile;
  std::error_code ec;
  if (!fs::exists(s.file, ec)) {
    fail("clip: no clip state '", s.file.string(),
         "' (the previous round writes it into its output; set \"resume_state\": false in the "
         "first round)");
  }
  json j;
  try {
    j = json::parse(read_small_file(s.file, kMaxJobBytes, CheckpointRule::kIo));
  } catch (const json::exception& e) {
    fail(s.file.string(), ": not a clip state (", e.what(), ")");
  }
  if (!j.is_object() || !j.contains("edgefuse_clip_state")) {
    fail(s.file.string(), ": not a clip state (no \"edgefuse_clip_state\" key)");
  }
  if (!j.contains("round") || !j.at("round").is_number_unsigned() ||
      j.at("round").get<std::uint64_t>() == 0) {
    fail(s.file.string(), ": \"round\" must be a positive integer");
  }
  s.round = j.at("round").get<std::uint64_t>();
  const double next = j.contains("next_norm") && j.at("next_norm").is_number()
                          ? j.at("next_norm").get<double>()
                          : std::nan("");
  if (!(next > 0.0) || !std::isfinite(next)) {
    fail(s.file.string(), ": \"next_norm\" must be a finite number > 0");
  }
  s.next_norm = next;
  const std::string id =
      j.contains("model") && j.at("model").is_string() ? j.at("model").get<std::string>() : "";
  const std::string target_id = checkpoint_metadata_value(target, kClipStateIdKey);
  if (id.empty() || id != target_id) {
    fail(s.file.string(), ": it belongs to another model (state id '", id, "'; the target '",
         target.path().string(), "' carries ",
         target_id.empty() ? std::string("none") : "'" + target_id + "'",
         "): a clip state is read only beside the model it was written with");
  }
  return s;
}

ClipReport start_clip_report(const ClipJob& clip,
                             const std::optional<PreviousClipState>& previous) {
  ClipReport r;
  r.rule = clip.adaptive ? "adaptive" : "fixed";
  r.norm = clip.adaptive && previous ? previous->next_norm : clip.norm;
  r.round = previous ? previous->round + 1 : 1;
  r.noise_multiplier = clip.noise_multiplier;
  if (previous) r.state_from = previous->file;
  return r;
}

void finish_clip_report(const ClipJob& clip, ClipReport& r) {
  const double k = static_cast<double>(r.clients.size());
  double unclipped = static_cast<double>(r.unclipped);
  if (clip.count_noise > 0.0) {
    unclipped += clip.count_noise * dp_standard_normal(*clip.seed, r.round, 0xFFFFFFFFu, 0);
  }
  r.unclipped_fraction = k > 0 ? unclipped / k : 0.0;
  r.next_norm = clip.adaptive
                    ? adaptive_clip_norm(r.norm, clip.lr, clip.quantile, r.unclipped_fraction)
                    : r.norm;
}

std::string clip_state_id(const FusionJob& job, const Checkpoint& target, const ClipReport& r) {
  const json params = {
      "clip", r.rule, r.round, r.norm, r.noise_multiplier, job.clip->seed.value_or(0)};
  std::vector<fs::path> previous;
  if (!r.state_from.empty()) previous.push_back(r.state_from);
  return lineage_id(job, target, params.dump(), previous);
}

std::string clip_state_json(const ClipReport& r, const std::string& id) {
  const json j = {{"edgefuse_clip_state", 1}, {"model", id},    {"rule", r.rule},
                  {"round", r.round},         {"norm", r.norm}, {"next_norm", r.next_norm}};
  return j.dump(1) + "\n";
}

}  // namespace edgefuse::detail
