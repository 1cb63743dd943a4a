// Private: the "server_optimizer" object of a job file (engine/job.h).
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "edgefuse/engine/job.h"

namespace edgefuse::detail {

// Reads the object; `label` names the job file, relative paths are relative to `base`. Throws
// Error naming the key and the rule broken.
ServerOptimizerJob parse_server_optimizer(const nlohmann::json& j, const std::string& label,
                                          const std::filesystem::path& base);

}  // namespace edgefuse::detail
