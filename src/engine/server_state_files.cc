// A server optimizer's state as files beside its model (src/engine/server_state_files.h).
#include "src/engine/server_state_files.h"

#include <stdexcept>
#include <vector>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/core/error.h"
#include "src/engine/lineage_id.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;
using nlohmann::json;

PreviousServerState open_previous_server_state(const ServerOptimizerJob& optimizer,
                                               const Checkpoint& target,
                                               const fs::path& target_folder) {
  PreviousServerState prev;
  prev.folder = optimizer.state.value_or(target_folder);
  if (!optimizer.resume_state) return prev;
  const std::string where =
      "server_optimizer: the previous state in '" + prev.folder.string() + "'";
  const fs::path index = prev.folder / (std::string(kServerStateStem) + ".safetensors.index.json");
  const fs::path single = prev.folder / (std::string(kServerStateStem) + ".safetensors");
  std::error_code ec;
  if (!fs::exists(index, ec) && !fs::exists(single, ec)) {
    fail(where, ": there is none (", kServerStateStem, ".safetensors or its index); set ",
         "\"resume_state\": false to start from zeros (the first round)");
  }
  prev.checkpoint = Checkpoint::open(fs::exists(index, ec) ? index : single);
  const Checkpoint& state = *prev.checkpoint;
  const std::string rule = checkpoint_metadata_value(state, kServerRuleKey);
  if (rule != server_rule_name(optimizer.step.rule)) {
    fail(where, ": it was written by rule '", rule, "' and the job asks for '",
         server_rule_name(optimizer.step.rule), "' (set \"resume_state\": false to start anew)");
  }
  const std::string steps = checkpoint_metadata_value(state, kServerStepKey);
  try {
    std::size_t used = 0;
    prev.steps = std::stoull(steps, &used);
    if (used != steps.size() || steps.empty() || steps[0] == '-')
      throw std::invalid_argument(steps);
  } catch (const std::exception&) {
    fail(where, ": its metadata '", kServerStepKey, "' is '", steps, "', not a step count");
  }
  const std::string id = checkpoint_metadata_value(state, kServerStateIdKey);
  const std::string target_id = checkpoint_metadata_value(target, kServerStateIdKey);
  if (id.empty() || id != target_id) {
    fail(where, ": it belongs to another model (state id '", id, "'; the target '",
         target.path().string(), "' carries ",
         target_id.empty() ? std::string("none") : "'" + target_id + "'",
         "): a state is stepped only beside the model it was written with");
  }
  return prev;
}

std::string server_state_id(const FusionJob& job, const Checkpoint& target,
                            const PreviousServerState& previous) {
  const ServerOptimizerJob& o = *job.server_optimizer;
  const std::string params = json{server_rule_name(o.step.rule),
                                  o.step.delta,
                                  o.step.lr,
                                  o.step.momentum,
                                  o.step.beta1,
                                  o.step.beta2,
                                  o.step.tau,
                                  o.bias_correction,
                                  previous.steps + 1}
                                 .dump();
  std::vector<std::filesystem::path> state_files;
  if (previous.checkpoint) {
    for (const auto& shard : previous.checkpoint->shards()) state_files.push_back(shard.path());
  }
  return lineage_id(job, target, params, state_files);
}

std::map<std::string, std::string> server_state_metadata(const ServerOptimizerJob& optimizer,
                                                         const std::string& id,
                                                         std::uint64_t steps) {
  return {{"format", "pt"},
          {kServerStateIdKey, id},
          {kServerRuleKey, server_rule_name(optimizer.step.rule)},
          {kServerStepKey, std::to_string(steps)}};
}

}  // namespace edgefuse::detail
