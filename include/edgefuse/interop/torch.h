// edgefuse/interop/torch.h — zero-copy bridges between edgefuse views and LibTorch tensors.
//
// The only public header that includes <torch/...>; link edgefuse::torch to use it. A
// contiguous CPU torch::Tensor and a TensorView describe the same bytes (dense, row-major),
// so the bridges copy nothing: as_torch wraps a view with torch::from_blob (the view's owner
// must outlive the tensor) and view_of exposes a tensor's storage to the kernels.
//
//   torch::Tensor w = torch::zeros({4096}, torch::kFloat);
//   edgefuse::accumulate(edgefuse::view_of(w).data_as<float>(), x, 4096, 0.5f);
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "edgefuse/core/tensor.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/extract/extract.h"

namespace edgefuse {

// The torch scalar type of a dtype. Throws Error for dtypes LibTorch 1.13 lacks
// (F4, F6_*, F8_*, U16, U32, U64, C64 have no torch equivalent there).
torch::ScalarType to_torch_dtype(DType dtype);

// The dtype of a torch scalar type. Throws Error for types safetensors cannot store.
DType from_torch_dtype(torch::ScalarType type);

// A CPU torch::Tensor over the view's memory, without copying or owning it.
// Throws Error if the dtype has no torch equivalent.
torch::Tensor as_torch(const TensorView& view);

// A view of a tensor's memory. Throws Error unless the tensor is defined, on the CPU, and
// contiguous, with a dtype safetensors can store.
TensorView view_of(const torch::Tensor& tensor);

// ---- Sub-model extraction and aggregation on state_dicts and modules (extract/*.h) ----

using StateDict = torch::OrderedDict<std::string, torch::Tensor>;

// Zero-copy views of a state_dict's tensors (each contiguous, on the CPU). The tensors must
// outlive the views.
NamedViews views_of(const StateDict& state);
// A module's parameters and buffers by their state_dict names, zero-copy.
StateDict state_dict_of(torch::nn::Module& module);

// The metas a schema binds (names, dtypes, shapes).
std::vector<TensorMeta> tensor_metas(const StateDict& state);

// extract() into torch tensors: each result owns its gathered storage (no further copy).
StateDict extract_state_dict(const NamedViews& target, const ModelLayout& layout, const Plan& plan,
                             std::optional<DType> dtype = std::nullopt);

// Copies `state` into the module's parameters and buffers of the same names (no autograd).
// Throws Error for a name the module lacks or a shape that differs; `strict` also requires
// every module tensor to be given.
void load_state_dict(torch::nn::Module& module, const StateDict& state, bool strict = true);

// Aggregator::finalize written in place into `target`'s own tensors (a module's
// state_dict_of() or any state_dict matching the aggregator's layout): the target is both the
// old values and the output, with no copy of the model.
std::vector<TensorCoverage> finalize_in_place(Aggregator& aggregator, const StateDict& target);

}  // namespace edgefuse
