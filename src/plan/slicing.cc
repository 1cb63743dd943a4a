// Slices of target tensors under a plan (src/plan/slicing.h).
#include "src/plan/slicing.h"

#include "edgefuse/core/error.h"

namespace edgefuse::detail {

PlanLists::PlanLists(const ModelLayout& layout, const Plan& plan) {
  const auto& axes = layout.axes();
  axis.resize(axes.size());
  aggregate_mask.resize(axes.size());
  for (std::size_t a = 0; a < axes.size(); ++a) {
    axis[a] = axis_indices(plan, layout, static_cast<int>(a));
    if (auto it = plan.aggregate_only.find(axes[a].name); it != plan.aggregate_only.end()) {
      aggregate_mask[a].assign(axes[a].size, false);
      for (auto i : it->second) {
        if (i < axes[a].size) aggregate_mask[a][i] = true;
      }
    }
  }
  const int la = layout.schema().find_axis(kLayerAxis);
  if (la >= 0) {
    local_layer.assign(axes[la].size, -1);
    const auto& l = axis[la];
    for (std::size_t i = 0; i < l.size(); ++i) local_layer[l[i]] = static_cast<std::int64_t>(i);
  }
}

namespace {
// The client's layer number for t (-1 for a tensor outside the layers), or -2 when the
// client does not hold t's layer.
std::int64_t local_layer_of(const ModelLayout::Tensor& t, const PlanLists& lists) {
  if (t.layer < 0) return -1;
  if (lists.local_layer.empty() || static_cast<std::size_t>(t.layer) >= lists.local_layer.size() ||
      lists.local_layer[static_cast<std::size_t>(t.layer)] < 0) {
    return -2;
  }
  return lists.local_layer[static_cast<std::size_t>(t.layer)];
}
}  // namespace

std::string local_name_of(const ModelLayout& layout, const ModelLayout::Tensor& t,
                          const PlanLists& lists) {
  const std::int64_t local_layer = local_layer_of(t, lists);
  return local_layer == -2 ? std::string() : ModelLayout::name_for(layout.rule_of(t), local_layer);
}

Slice slice_shape_of(const ModelLayout& layout, const ModelLayout::Tensor& t,
                     const PlanLists& lists) {
  Slice s;
  const std::int64_t local_layer = local_layer_of(t, lists);
  if (local_layer == -2) return s;  // the client does not hold this layer
  const TensorRule& rule = layout.rule_of(t);
  s.included = true;
  s.local_name = ModelLayout::name_for(rule, local_layer);
  const int rank = t.meta.shape.rank();
  std::vector<std::uint64_t> dims(static_cast<std::size_t>(rank));
  for (int d = 0; d < rank; ++d) {
    const DimBinding& b = rule.dims[static_cast<std::size_t>(d)];
    if (b.axis == DimBinding::kNoAxis) {
      dims[static_cast<std::size_t>(d)] = t.meta.shape[d];
    } else {
      const Axis& ax = layout.axes()[static_cast<std::size_t>(b.axis)];
      dims[static_cast<std::size_t>(d)] =
          std::uint64_t{b.repeat} * lists.axis[static_cast<std::size_t>(b.axis)].size() * ax.group;
    }
  }
  s.local_shape = Shape(dims.data(), rank);
  return s;
}

Slice slice_of(const ModelLayout& layout, const ModelLayout::Tensor& t, const PlanLists& lists,
               bool with_masks) {
  Slice s = slice_shape_of(layout, t, lists);
  if (!s.included) return s;  // the client does not hold this layer
  const TensorRule& rule = layout.rule_of(t);
  const int rank = t.meta.shape.rank();
  s.elems.resize(static_cast<std::size_t>(rank));
  if (with_masks) s.keep.resize(static_cast<std::size_t>(rank));
  for (int d = 0; d < rank; ++d) {
    auto& e = s.elems[static_cast<std::size_t>(d)];
    const DimBinding& b = rule.dims[static_cast<std::size_t>(d)];
    if (b.axis == DimBinding::kNoAxis) {
      e.resize(t.meta.shape[d]);
      for (std::uint64_t i = 0; i < e.size(); ++i) e[i] = static_cast<std::uint32_t>(i);
    } else {
      const Axis& ax = layout.axes()[static_cast<std::size_t>(b.axis)];
      const auto& list = lists.axis[static_cast<std::size_t>(b.axis)];
      const auto& mask = lists.aggregate_mask[static_cast<std::size_t>(b.axis)];
      e.resize(std::uint64_t{b.repeat} * list.size() * ax.group);
      std::size_t k = 0;
      for (std::uint32_t p = 0; p < b.repeat; ++p) {
        for (auto idx : list) {
          const auto first = static_cast<std::uint32_t>((p * ax.size + idx) * ax.group);
          for (std::uint64_t g = 0; g < ax.group; ++g)
            e[k++] = first + static_cast<std::uint32_t>(g);
        }
      }
      if (with_masks) {
        std::vector<bool>& keep = s.keep[static_cast<std::size_t>(d)];
        keep.assign(e.size(), true);
        if (!mask.empty()) {
          k = 0;
          for (std::uint32_t p = 0; p < b.repeat; ++p) {
            for (auto idx : list) {
              for (std::uint64_t g = 0; g < ax.group; ++g) keep[k++] = mask[idx];
            }
          }
        }
      }
    }
    if (with_masks && b.axis == DimBinding::kNoAxis) {
      s.keep[static_cast<std::size_t>(d)].assign(e.size(), true);
    }
  }
  return s;
}

std::map<std::string, std::size_t> tensors_by_local_name(const ModelLayout& layout,
                                                         const PlanLists& lists) {
  std::map<std::string, std::size_t> by_local;
  for (std::size_t i = 0; i < layout.tensors().size(); ++i) {
    std::string local = local_name_of(layout, layout.tensors()[i], lists);
    if (!local.empty()) by_local.emplace(std::move(local), i);
  }
  return by_local;
}

}  // namespace edgefuse::detail
