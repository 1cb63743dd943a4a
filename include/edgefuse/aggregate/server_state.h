// edgefuse/aggregate/server_state.h — a server optimizer's per-element state, in memory and as
// tensors of a checkpoint.
//
// Every F32, BF16 or F16 tensor T of the layout has "T.m" (the momentum buffer of kFedAvgM and
// kNesterov, the first moment of the adaptive rules) and, for kFedAdam, kFedYogi and
// kFedAdagrad, "T.v" (the second moment): F32, T's shape. Other tensors have none. The first
// round starts from zeros.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/extract/extract.h"
#include "edgefuse/kernels/server_step.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse {

// The state as views, per layout tensor in layout order, updated in place by
// Aggregator::finalize(target, out, state) (v empty or of empty views without a second moment;
// empty views for tensors without state).
struct ServerState {
  std::vector<TensorView> m, v;
};

// Whether `rule` keeps a second moment (v).
bool server_rule_has_v(ServerRule rule) noexcept;

// "fedavgm", "fedadam", "fedyogi", "fedadagrad", "nesterov": the rule's name in job files and
// state metadata, and back (nullopt for an unknown name).
const char* server_rule_name(ServerRule rule) noexcept;
std::optional<ServerRule> server_rule_from_name(std::string_view name) noexcept;

// "T.m" or "T.v" for which = 'm' or 'v'.
std::string server_state_name(std::string_view tensor, char which);

// The state tensors `previous` holds for the layout's tensors, by name: for each layout tensor,
// its m and v view (empty where it has none). `previous` must hold exactly the state tensors
// of the layout for `rule`, each F32 of its tensor's shape; an empty `previous` gives empty
// views (zeros). Throws Error naming `label`, the tensor and the rule broken (missing, extra,
// dtype, shape).
struct ServerStateViews {
  std::vector<ConstTensorView> m, v;
};
ServerStateViews bind_server_state(const ModelLayout& layout, ServerRule rule,
                                   const NamedViews& previous, const std::string& label);

}  // namespace edgefuse
