// Private: the rule objects of a job file (engine/job.h): "server_optimizer", "aggregation" and
// "clip".
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "edgefuse/engine/job.h"

namespace edgefuse::detail {

// Reads the object; `label` names the job file, relative paths are relative to `base`. Throws
// Error naming the key and the rule broken.
ServerOptimizerJob parse_server_optimizer(const nlohmann::json& j, const std::string& label,
                                          const std::filesystem::path& base);

// "mean" (neither rule), "median", "trimmed_mean", "krum", "multi_krum", "bulyan", or an object
// {"rule": ..., "beta": 0.2} (trimmed_mean), {"rule": ..., "f": 0} (krum, bulyan), {"rule":
// "multi_krum", "f": 0, "m": 1}. Throws Error naming the key and the rule broken.
AggregationJob parse_aggregation(const nlohmann::json& j, const std::string& label);

// The "clip" object (engine/job.h). Throws Error naming the key and the rule broken.
ClipJob parse_clip(const nlohmann::json& j, const std::string& label,
                   const std::filesystem::path& base);

}  // namespace edgefuse::detail
