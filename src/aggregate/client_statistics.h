// Private: the whole-update statistics pass (aggregate/selection.h ClientStatistics) over an
// Aggregator's clients, and the selection that zeroes the weights of the clients left out.
#pragma once

#include <vector>

#include "edgefuse/aggregate/selection.h"
#include "edgefuse/plan/schema.h"
#include "src/aggregate/low_rank_share.h"
#include "src/aggregate/share_cache.h"
#include "src/aggregate/sub_model_share.h"

namespace edgefuse::detail {

// Every aggregatable tensor in fixed tiles of rows (their size does not depend on the
// options), each client's values gathered per tile and summed in f64 in element order, the
// tiles' sums added in tile order: the same bits for any thread count. `pairs`: also the pair
// sums (k^2 work per element); `dots`: also the pair products (the Gram matrix). Clients of
// weight 0 take no part (all zeros).
ClientStatistics compute_client_statistics(const ModelLayout& layout, ShareCache& shares,
                                           const std::vector<SubModelClient>& clients,
                                           const std::vector<LowRankClient>& low_rank, bool pairs,
                                           bool dots = false);

}  // namespace edgefuse::detail
