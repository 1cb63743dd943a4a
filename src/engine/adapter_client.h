// Private: a PEFT adapter as a client of the fusion engine, read through mmap. Each module's
// factors are converted, checked and cut to the rows and columns its plan covers only when the
// aggregator asks for that tensor (once to check them at registration, once when the tensor
// is computed), so a round holds one tensor's factors of every adapter, not whole adapters.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "edgefuse/aggregate/low_rank.h"
#include "edgefuse/io/peft.h"
#include "edgefuse/plan/plan.h"
#include "src/plan/slicing.h"

namespace edgefuse::detail {

class AdapterClient {
 public:
  // Throws Error for a DoRA adapter, a module whose weight the (plan's sub-)model lacks or
  // whose shape differs, or two modules of one weight.
  AdapterClient(const std::filesystem::path& folder, const ModelLayout& layout,
                const std::optional<Plan>& plan);
  // The target tensors it updates (modules whose rows or columns the plan masks out entirely
  // are left out).
  const std::vector<std::string>& tensors() const noexcept { return tensors_; }
  // Bytes held until the round ends: the adapter's tensor index, the plan's lists, the map.
  std::uint64_t bytes() const;
  // The delta to target tensor `tensor`, cut to the rows and columns its plan covers.
  LowRankDelta make(const std::string& tensor) const;

 private:
  const ModelLayout& layout_;
  PeftAdapter peft_;
  std::string label_;
  std::unique_ptr<PlanLists> lists_;
  std::map<std::string, std::size_t> pair_of_;  // target tensor -> pair index
  std::vector<std::string> tensors_;
};

}  // namespace edgefuse::detail
