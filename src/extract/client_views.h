// Private: a client's tensors under index lists already built, and the target's views by
// name (shared by extraction and aggregation).
#pragma once

#include <map>
#include <optional>
#include <string_view>
#include <vector>

#include "edgefuse/extract/extract.h"
#include "src/plan/slicing.h"

namespace edgefuse::detail {

// client_tensors() for index lists already built.
std::vector<ClientTensor> client_tensors(const ModelLayout& layout, const PlanLists& lists,
                                         std::optional<DType> dtype);

// The target's view of layout tensor t; throws Error when it is missing or its shape or
// dtype differs from the layout's.
const ConstTensorView& find_target(
    const std::map<std::string_view, const ConstTensorView*>& by_name,
    const ModelLayout::Tensor& t);
std::map<std::string_view, const ConstTensorView*> index_views(const NamedViews& views);

}  // namespace edgefuse::detail
