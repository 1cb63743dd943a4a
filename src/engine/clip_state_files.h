// Private: the clip state of the job key "clip" as a file beside the model it belongs to. The
// engine writes edgefuse_clip_state.json into its output folder, in the same commit as the
// model, and reads the previous round's from the folder the job names (default the target's).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "edgefuse/engine/fuse.h"
#include "edgefuse/engine/job.h"
#include "edgefuse/io/checkpoint.h"

namespace edgefuse::detail {

inline constexpr char kClipStateFile[] = "edgefuse_clip_state.json";
// The metadata key of the model's shards holding the clip state's id (src/engine/lineage_id.h).
inline constexpr char kClipStateIdKey[] = "edgefuse_clip_state";

struct PreviousClipState {
  std::filesystem::path file;
  std::uint64_t round = 0;  // the round that wrote it
  double next_norm = 0.0;   // the norm it left for this round
};

// With resume_state, the state in the job's state folder (else nullopt: the first round).
// Throws Error naming the file and the rule broken: missing, unreadable, not the state's JSON,
// a round that is not a positive integer, a norm that is not > 0 and finite, a "model" id that
// is not the one the target's shards carry (a state written beside another model).
std::optional<PreviousClipState> read_previous_clip_state(
    const ClipJob& clip, const std::filesystem::path& target_folder, const Checkpoint& target);

// The id of the clip state this job writes (src/engine/lineage_id.h): of the rule, the round,
// the norm, the noise, the target, the previous state file and the clients.
std::string clip_state_id(const FusionJob& job, const Checkpoint& target, const ClipReport& report);

// This round's clip options (aggregate/clipping.h) and report skeleton: C (the job's fixed
// norm, adaptive's initial one in the first round, else the state's next norm) and the round.
ClipReport start_clip_report(const ClipJob& clip, const std::optional<PreviousClipState>& previous);

// After the round's clipping: the unclipped fraction (noised with count_noise, keyed by the
// seed, the round and tensor index 2^32 - 1) and the next norm.
void finish_clip_report(const ClipJob& clip, ClipReport& report);

// The state file's text: {"edgefuse_clip_state": 1, "model" (the id), "rule", "round", "norm",
// "next_norm"}.
std::string clip_state_json(const ClipReport& report, const std::string& id);

}  // namespace edgefuse::detail
