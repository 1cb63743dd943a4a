// edgefuse/extract/extract.h — cut a client's sub-model out of the target through its plan.
//
// The server half of HeteroFL / FedRolex / FjORD / Federated Dropout / DepthFL
// every dimension bound to an axis keeps the plan's indices of that axis,
// in the plan's (client-local) order, so the local tensor is the gather W[O, I] of the
// target; layers are renumbered (client layer i is target layer plan.layers[i]); tensors of
// layers the client does not hold are left out. Values are copied exactly, or converted
// (f32/bf16/f16, round to nearest even) when another dtype is requested.
//
//   auto layout = schema.bind(edgefuse::tensor_metas(target));
//   auto plan = edgefuse::parse_plan(plan_json, layout, "client3.json");
//   auto client = edgefuse::extract(edgefuse::views_of(target), layout, plan,
//   edgefuse::DType::kBF16);
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "edgefuse/core/tensor.h"
#include "edgefuse/plan/plan.h"

namespace edgefuse {

class Checkpoint;
class CheckpointWriter;

struct NamedView {
  std::string name;
  ConstTensorView view;
};
using NamedViews = std::vector<NamedView>;

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// Zero-copy views of every tensor of a checkpoint (valid while the checkpoint is open).
NamedViews views_of(const Checkpoint& checkpoint);
// Views of owned tensors.
NamedViews views_of(const std::vector<NamedTensor>& tensors);

// What the client's model holds: local name, target name, dtype and local shape of each
// tensor, in the layout's order. `dtype` replaces the float tensors' dtype when given.
struct ClientTensor {
  std::string name;
  std::string target_name;
  std::size_t target_index;  // into layout.tensors()
  DType dtype;
  Shape shape;
};
std::vector<ClientTensor> client_tensors(const ModelLayout& layout, const Plan& plan,
                                         std::optional<DType> dtype = std::nullopt);

// The client's model in memory. `target` must hold every tensor of the layout with its
// shape. `dtype` (F32, BF16 or F16) converts the float tensors; others are copied as they
// are. Throws Error for a missing or mis-shaped target tensor or an unsupported conversion.
std::vector<NamedTensor> extract(const NamedViews& target, const ModelLayout& layout,
                                 const Plan& plan, std::optional<DType> dtype = std::nullopt);

// The same, streamed: declares every client tensor on `writer` with a producer that gathers
// its bytes piece by piece at commit time (the views must stay valid until then).
void extract_to(CheckpointWriter& writer, const NamedViews& target, const ModelLayout& layout,
                const Plan& plan, std::optional<DType> dtype = std::nullopt);

}  // namespace edgefuse
