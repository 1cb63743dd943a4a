// Private: a server optimizer's state as files beside the model it belongs to. The engine
// writes the state into its output as the file group "server_state" (server_state.safetensors,
// or shards with server_state.safetensors.index.json), and reads the previous round's from the
// folder the job names. A state and its model carry the same id in their shards' metadata, so
// a state is never stepped from beside another model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "edgefuse/engine/job.h"
#include "edgefuse/io/checkpoint.h"

namespace edgefuse::detail {

inline constexpr char kServerStateStem[] = "server_state";
inline constexpr char kServerStateIdKey[] = "edgefuse_server_state";  // model's and state's
inline constexpr char kServerRuleKey[] = "edgefuse_server_rule";      // state's
inline constexpr char kServerStepKey[] = "edgefuse_server_step";      // state's: steps taken

struct PreviousServerState {
  std::optional<Checkpoint> checkpoint;  // none: the step starts from zeros
  std::filesystem::path folder;          // where it was looked for
  std::uint64_t steps = 0;               // steps it has taken
};

// The state the job's step starts from. With resume_state, the folder must hold one, written
// by the same rule, whose id is the one the target's shards carry. Throws Error naming the
// folder (or file) and the rule broken; the tensors are checked against the layout later
// (bind_server_state).
PreviousServerState open_previous_server_state(const ServerOptimizerJob& optimizer,
                                               const Checkpoint& target,
                                               const std::filesystem::path& target_folder);

// The id of the state this job writes (src/engine/lineage_id.h): of the optimizer's
// parameters and step count, the target, the previous state and the clients.
std::string server_state_id(const FusionJob& job, const Checkpoint& target,
                            const PreviousServerState& previous);

// The metadata of the state's shards.
std::map<std::string, std::string> server_state_metadata(const ServerOptimizerJob& optimizer,
                                                         const std::string& id,
                                                         std::uint64_t steps);

}  // namespace edgefuse::detail
