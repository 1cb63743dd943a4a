// Private: a job's clients registered with the aggregator, in the order of their names, each
// accepted or rejected with the step that refused it, within the memory budget.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "edgefuse/engine/fuse.h"
#include "edgefuse/io/checkpoint.h"

namespace edgefuse::detail {

class ClientRegistry {
 public:
  ClientRegistry(const ModelLayout& layout, Aggregator& aggregator)
      : layout_(layout), agg_(aggregator) {}
  // Registers every client of `job` in canonical order (names, ties broken by path and
  // weight, so the job file's order does not matter). Fills report.accepted, .rejected,
  // .bytes_read and .client_state_bytes. Throws Error, before anything is written, when the
  // clients' state with the engine's `working` bytes exceeds the job's memory budget.
  void register_all(const FusionJob& job, std::uint64_t working, FusionReport& report);

 private:
  // One client; throws Error, with `step` set to the step that refused it.
  void register_one(const FusionClient& c, RejectionKind& step);

  const ModelLayout& layout_;
  Aggregator& agg_;
  std::set<std::string> names_;
  std::map<std::pair<dev_t, ino_t>, std::string> files_;  // the file read -> client name
  std::vector<std::unique_ptr<Checkpoint>> updates_;      // mapped until the round ends
  std::uint64_t files_bytes_ = 0, adapters_bytes_ = 0;
};

}  // namespace edgefuse::detail
