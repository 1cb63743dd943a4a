// Private: how one target tensor is sliced by one plan (extraction, aggregation, LoRA lifting
// and the engine all use it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "edgefuse/plan/plan.h"

namespace edgefuse::detail {

// Per-axis lists of a plan (the plan's list, or every index), and each layer's local number.
struct PlanLists {
  std::vector<std::vector<std::uint32_t>> axis;   // by axis index of the layout
  std::vector<std::int64_t> local_layer;          // target layer -> client layer or -1
  std::vector<std::vector<bool>> aggregate_mask;  // by axis; empty = no mask
  PlanLists(const ModelLayout& layout, const Plan& plan);
};

struct Slice {
  bool included = false;
  std::string local_name;
  Shape local_shape;
  // elems[d][i]: target element index of local element i along dimension d.
  std::vector<std::vector<std::uint32_t>> elems;
  // keep[d][i]: whether local element i of dimension d is aggregated (aggregate_only).
  std::vector<std::vector<bool>> keep;
};

// The client-local name of t, or "" when the client does not hold t's layer.
std::string local_name_of(const ModelLayout& layout, const ModelLayout::Tensor& t,
                          const PlanLists& lists);

// The layout index of each tensor the client holds, by its client-local name (the names of
// the sub-model's checkpoint, which a sub-model's LoRA modules target).
std::map<std::string, std::size_t> tensors_by_local_name(const ModelLayout& layout,
                                                         const PlanLists& lists);

Slice slice_of(const ModelLayout& layout, const ModelLayout::Tensor& t, const PlanLists& lists,
               bool with_masks);

// included, local_name and local_shape only (elems and keep left empty): what listing a
// client's tensors needs, without an element list per dimension.
Slice slice_shape_of(const ModelLayout& layout, const ModelLayout::Tensor& t,
                     const PlanLists& lists);

inline bool is_aggregatable(DType d) {
  return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16;
}

}  // namespace edgefuse::detail
