// Private: the checks a client meets before it joins a round: its weight, its plan, the
// tensors of its update, and the finiteness of its values.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "edgefuse/aggregate/options.h"
#include "src/aggregate/sub_model_share.h"

namespace edgefuse::detail {

// add() and add_rows(): a weight that is negative or not finite is an Error naming `label`.
void check_client_weight(float weight, const std::string& label);
// add_low_rank(): delta mode, and a finite weight >= 0.
void check_low_rank_client(AggregateMode mode, float weight, const std::string& label);

// One client's tensors to scan for NaN and Inf, in the order they are reported.
struct ScanJob {
  const std::string* label;
  std::vector<std::pair<std::string_view, const ConstTensorView*>> tensors;
};
// Scans the jobs' tensors in parallel pieces; per job, add()'s message for its first NaN or
// Inf value in the order given, or "" when it holds none.
std::vector<std::string> nonfinite_faults(const std::vector<ScanJob>& jobs);

// Fills client.local and client.holds from `update`, which must hold exactly the tensors
// `tensors` (the client's plan) names, with those shapes and dtypes F32, BF16 or F16 (the
// target's own dtype for a tensor that is not a float). Scans the values for NaN and Inf
// unless `may_defer` and the client's values will all be read while fusing (weight not 0,
// no "aggregate_only" mask); returns whether it left that scan to finalize. Throws Error
// naming the client, the tensor and the rule broken; `client` is then unusable.
bool take_update(const ModelLayout& layout, const NamedViews& update,
                 const std::vector<ClientTensor>& tensors, bool may_defer, SubModelClient& client);

}  // namespace edgefuse::detail
