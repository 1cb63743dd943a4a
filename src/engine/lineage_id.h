// Private: the id that ties a round's state (a server optimizer's, the clip state) to the
// model written with it. The model's shards carry it in their metadata and the state carries
// it too, so the next round refuses a state that lies beside another model.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "edgefuse/engine/job.h"
#include "edgefuse/io/checkpoint.h"

namespace edgefuse::detail {

// XXH3-64 (16 hex digits) of `params` (the rule's parameters and the round), a sample of the
// target, of each extra file (the previous state) and of every client's checkpoint and plan in
// name order (each file's name, size, first and last 64 KiB). The same inputs give the same
// id, so outputs stay reproducible; another round or another lineage of the model gives
// another.
std::string lineage_id(const FusionJob& job, const Checkpoint& target, const std::string& params,
                       const std::vector<std::filesystem::path>& extra_files);

// The value of `key` in the metadata of the checkpoint's first shard ("" when absent).
std::string checkpoint_metadata_value(const Checkpoint& checkpoint, const char* key);

}  // namespace edgefuse::detail
