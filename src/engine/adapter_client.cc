// A PEFT adapter as a fusion client (src/engine/adapter_client.h).
#include "src/engine/adapter_client.h"

#include <algorithm>

#include "edgefuse/core/error.h"
#include "edgefuse/lora/adapter.h"
#include "src/lora/operands.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;

AdapterClient::AdapterClient(const fs::path& folder, const ModelLayout& layout,
                             const std::optional<Plan>& plan)
    : layout_(layout),
      peft_(PeftAdapter::open(folder)),
      label_("adapter '" + folder.string() + "'") {
  reject_unmergeable(peft_, folder.string(), /*allow_dora=*/false);  // DoRA is not a delta
  std::map<std::string, std::size_t> by_local;  // client-local weight name -> layout index
  if (plan) {
    validate_plan(*plan, layout, folder.string() + ": plan");
    lists_ = std::make_unique<PlanLists>(layout, *plan);
    by_local = tensors_by_local_name(layout, *lists_);
  }
  for (std::size_t p = 0; p < peft_.pairs().size(); ++p) {
    const LoraPair& pair = peft_.pairs()[p];
    const bool transposed =
        pair.kind == LoraPair::Kind::kEmbedding || peft_.config().fan_in_fan_out;
    const Shape want = transposed ? Shape{pair.in_features, pair.out_features}
                                  : Shape{pair.out_features, pair.in_features};
    std::size_t ti = 0;
    Shape have;
    Slice slice;
    if (lists_) {
      const auto it = by_local.find(pair.base_weight);
      if (it == by_local.end()) {
        fail(label_, ": module '", pair.module, "' targets '", pair.base_weight,
             "', which the plan's sub-model does not have");
      }
      ti = it->second;
      slice = slice_of(layout, layout.tensors()[ti], *lists_, true);
      have = slice.local_shape;
    } else {
      const ModelLayout::Tensor* t = layout.find(pair.base_weight);
      if (t == nullptr) {
        fail("module '", pair.module, "' targets '", pair.base_weight, "', which the target lacks");
      }
      ti = static_cast<std::size_t>(t - layout.tensors().data());
      have = t->meta.shape;
    }
    if (have != want) {
      fail("module '", pair.module, "' needs a weight of ", want.to_string(), " but '",
           pair.base_weight, "' is ", have.to_string());
    }
    // A module whose rows or columns the plan's aggregate_only masks out entirely adds nothing.
    if (lists_) {
      const auto kept = [&](int d) {
        return std::count(slice.keep[d].begin(), slice.keep[d].end(), true) > 0;
      };
      if (!kept(0) || !kept(1)) continue;
    }
    const std::string& name = layout.tensors()[ti].meta.name;
    if (!pair_of_.emplace(name, p).second) {
      fail("modules of '", name, "' given twice");
    }
    tensors_.push_back(name);
  }
}

std::uint64_t AdapterClient::bytes() const {
  std::uint64_t b = sizeof(*this) + 160 * (peft_.pairs().size() + tensors_.size());
  for (const auto& e : peft_.checkpoint().tensors())
    b += sizeof(e) + sizeof(*e.info) + e.info->name.size();
  if (lists_) {
    for (const auto& list : lists_->axis) b += 24 + 4 * list.size();
    b += 8 * lists_->local_layer.size();
  }
  return b;
}

LowRankDelta AdapterClient::make(const std::string& tensor) const {
  const LoraPair& p = peft_.pairs()[pair_of_.at(tensor)];
  const LoraModule m = make_lora_module(p.module, peft_.a(p), peft_.b(p), p.scaling, label_, p.kind,
                                        peft_.config().fan_in_fan_out);
  const auto op = lora_operands(m);
  LowRankDelta d;
  d.tensor = tensor;
  d.rank = static_cast<std::size_t>(op->rank);
  d.scale = static_cast<float>(m.scaling);
  const float* l = op->l.view().data_as<float>();
  const float* r = op->r.view().data_as<float>();
  if (!lists_) {
    d.l.assign(l, l + op->l.numel());
    d.r.assign(r, r + op->r.numel());
    return d;
  }
  // Covered (target, local) rows and columns in target order; L and R cut to them.
  const auto& t = *layout_.find(tensor);
  const Slice s = slice_of(layout_, t, *lists_, true);
  std::vector<std::pair<std::uint32_t, std::uint32_t>> at[2];
  for (int dim = 0; dim < 2; ++dim) {
    for (std::size_t i = 0; i < s.elems[dim].size(); ++i) {
      if (s.keep[dim][i]) at[dim].push_back({s.elems[dim][i], static_cast<std::uint32_t>(i)});
    }
    std::sort(at[dim].begin(), at[dim].end());
  }
  const std::size_t rank = d.rank, cols = static_cast<std::size_t>(op->cols);
  for (const auto& [target, local] : at[0]) {
    d.rows.push_back(target);
    d.l.insert(d.l.end(), l + std::size_t{local} * rank, l + (std::size_t{local} + 1) * rank);
  }
  d.r.resize(rank * at[1].size());
  for (std::size_t j = 0; j < at[1].size(); ++j) {
    d.cols.push_back(at[1][j].first);
    for (std::size_t k = 0; k < rank; ++k)
      d.r[k * at[1].size() + j] = r[k * cols + at[1][j].second];
  }
  return d;
}

}  // namespace edgefuse::detail
