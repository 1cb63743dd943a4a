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

#include "edgefuse/core/tensor.h"

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

}  // namespace edgefuse
