// edgefuse/plan/plan.h — one client's sub-model: an index list per axis of a schema.
//
// The generic primitive of sub-model extraction: a plan maps axis names to lists of target
// indices in *client-local order* (local position i is target index list[i]); an axis the
// plan omits is kept whole. The layer axis lists the target layers the client holds (client
// layer i is target layer list[i]). Plans come from explicit lists or from the policies of
// policies.h, written in JSON as
//   {"hidden": {"policy": "fedrolex", "rate": 0.25, "round": 7},
//    "kv_heads": {"policy": "heterofl", "rate": "1/4"},
//    "mlp": [0, 5, 9], "layers": {"policy": "stride", "rate": 0.5},
//    "aggregate_only": {"vocab": [17, 42]}}
// Grouped-query attention stays valid when the schema has axes
// "heads" and "kv_heads" (g = heads/kv_heads query heads per KV head): a kv_heads entry picks
// whole groups and, without a heads entry, the client gets every query head of its groups; a
// heads *policy* picks the same local head ids inside every kept group (resolved on g), or on
// all heads when g = 1; explicit head lists must keep each query head with its KV head.
// "aggregate_only" restricts aggregation (not extraction) of an axis to the listed target
// indices: HeteroFL's label-split rule for the rows of tokens a client saw.
//
//   edgefuse::Plan p = edgefuse::parse_plan(text, layout, "client7.json");
//   std::string resolved = edgefuse::plan_to_json(p);   // explicit lists
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/plan/schema.h"

namespace edgefuse {

struct Plan {
  std::map<std::string, std::vector<std::uint32_t>> axes;            // includes "layers"
  std::map<std::string, std::vector<std::uint32_t>> aggregate_only;  // sorted target indices
};

// Parses a plan and resolves its policies against the layout's axis sizes. Policy objects:
//   {"policy": "heterofl"|"prefix"|"fjord", "rate"|"p"|"count": ...}
//   {"policy": "fedrolex"|"rolling", "rate"|"count", "round": t, "offset"?: o,
//    "convention"?: "forward"|"backward"}
//   {"policy": "random", "rate"|"count", "seed": s}
//   {"policy": "stride", "rate"|"count"}
//   {"policy": "full"}
// Rates are numbers or strings ("1/3"), read exactly; "count" is an index count. Lists from
// policies on the layer axis are sorted (a model keeps its layer order). Throws Error naming
// `label` and the axis for unknown axes or keys, bad rates, and every problem validate_plan
// finds.
Plan parse_plan(std::string_view json_text, const ModelLayout& layout, const std::string& label);

// Checks a plan against a layout: known axes, indices below the axis size, no repeats, no
// empty list, GQA consistency. Throws Error naming `label`, the axis and the index.
void validate_plan(const Plan& plan, const ModelLayout& layout, const std::string& label);

// {"<axis>": [..], ..., "aggregate_only": {..}} with every list explicit.
std::string plan_to_json(const Plan& plan);

// The list for `axis`: the plan's, or every index when the plan omits it.
std::vector<std::uint32_t> axis_indices(const Plan& plan, const ModelLayout& layout, int axis);

}  // namespace edgefuse
