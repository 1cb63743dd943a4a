// The bytes an Aggregator keeps for its clients (src/aggregate/resident_memory.h).
#include "src/aggregate/resident_memory.h"

#include <algorithm>

namespace edgefuse::detail {

ResidentMemory::ResidentMemory(const ModelLayout& layout)
    : while_computing_(layout.tensors().size(), 0),
      rule_(layout.schema().rules().size(), 0),
      layer_rule_(layout.schema().rules().size(), false) {
  for (const auto& t : layout.tensors()) {
    if (t.layer >= 0) layer_rule_[t.rule] = true;
  }
}

void ResidentMemory::add_sub_model_client(const ModelLayout& layout, const SubModelClient& c,
                                          const std::vector<ClientTensor>& tensors) {
  std::uint64_t b = sizeof(SubModelClient) + c.label.size() +
                    c.local.size() * sizeof(ConstTensorView) + c.holds.size() + sizeof(PlanLists);
  for (const auto& [axis, list] : c.plan.axes) b += 64 + axis.size() + 4 * list.size();
  for (const auto& [axis, list] : c.plan.aggregate_only) b += 64 + axis.size() + 4 * list.size();
  for (const auto& list : c.lists->axis) b += 24 + 4 * list.size();
  for (const auto& mask : c.lists->aggregate_mask) b += 24 + mask.size() / 8;
  b += 8 * c.lists->local_layer.size();
  kept_ += b;
  // Axes the client holds whole and in order, unmasked: tensors whose rows run along one of
  // them keep no row lists (their shares map rows to themselves).
  std::vector<char> whole(c.lists->axis.size(), 0);
  for (std::size_t a = 0; a < whole.size(); ++a) {
    const auto& list = c.lists->axis[a];
    bool in_order = list.size() == layout.axes()[a].size && c.lists->aggregate_mask[a].empty();
    for (std::size_t i = 0; i < list.size() && in_order; ++i) in_order = list[i] == i;
    whole[a] = in_order ? 1 : 0;
  }
  std::vector<std::uint64_t> per_rule(rule_.size(), 0);
  for (const auto& ct : tensors) {
    if (!c.holds[ct.target_index]) continue;
    const auto& t = layout.tensors()[ct.target_index];
    bool identity_rows = t.meta.shape.rank() < 2;
    if (!identity_rows) {
      const DimBinding& d0 = layout.rule_of(t).dims[0];
      identity_rows = d0.axis == DimBinding::kNoAxis || whole[static_cast<std::size_t>(d0.axis)];
    }
    const std::uint64_t share = SubModelShare::bound(ct.shape, identity_rows);
    // Built per tensor, or (a {layer} rule) kept for the rule: counted both ways.
    while_computing_[ct.target_index] += share;
    if (t.layer >= 0) per_rule[t.rule] = std::max(per_rule[t.rule], share);
    // While one share is built its row pairs and lists exist even when freed after.
    const std::uint64_t rows = ct.shape.rank() >= 2 ? ct.shape[0] : 1;
    build_peak_ = std::max(build_peak_, 24 * rows);
  }
  for (std::size_t r = 0; r < per_rule.size(); ++r) rule_[r] += per_rule[r];
}

std::uint64_t ResidentMemory::total(std::size_t sub_model_clients, std::size_t threads) const {
  std::uint64_t most = 0, kept = 0;
  for (const std::uint64_t b : while_computing_) most = std::max(most, b);
  // The shares kept per {layer} rule, each with a slot per sub-model client.
  for (std::size_t r = 0; r < rule_.size(); ++r) {
    if (layer_rule_[r]) kept += rule_[r] + (sizeof(SubModelShare) + 2) * sub_model_clients;
  }
  // Shares of a tensor are built on every thread at once.
  return kept_ + most + kept + build_peak_ * std::max<std::size_t>(1, threads);
}

}  // namespace edgefuse::detail
