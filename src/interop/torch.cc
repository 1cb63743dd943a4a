// LibTorch bridges (edgefuse/interop/torch.h).
#include "edgefuse/interop/torch.h"

#include <vector>

namespace edgefuse {

torch::ScalarType to_torch_dtype(DType dtype) {
  switch (dtype) {
    case DType::kBool: return torch::kBool;
    case DType::kU8: return torch::kUInt8;
    case DType::kI8: return torch::kInt8;
    case DType::kI16: return torch::kInt16;
    case DType::kI32: return torch::kInt32;
    case DType::kI64: return torch::kInt64;
    case DType::kF16: return torch::kHalf;
    case DType::kBF16: return torch::kBFloat16;
    case DType::kF32: return torch::kFloat;
    case DType::kF64: return torch::kDouble;
    default: break;
  }
  detail::fail("to_torch_dtype: ", dtype_name(dtype), " has no LibTorch 1.13 scalar type");
}

DType from_torch_dtype(torch::ScalarType type) {
  switch (type) {
    case torch::kBool: return DType::kBool;
    case torch::kUInt8: return DType::kU8;
    case torch::kInt8: return DType::kI8;
    case torch::kInt16: return DType::kI16;
    case torch::kInt32: return DType::kI32;
    case torch::kInt64: return DType::kI64;
    case torch::kHalf: return DType::kF16;
    case torch::kBFloat16: return DType::kBF16;
    case torch::kFloat: return DType::kF32;
    case torch::kDouble: return DType::kF64;
    default: break;
  }
  detail::fail("from_torch_dtype: torch type ", c10::toString(type),
               " has no safetensors dtype");
}

torch::Tensor as_torch(const TensorView& view) {
  const torch::ScalarType type = to_torch_dtype(view.dtype());
  std::vector<std::int64_t> sizes(view.shape().begin(), view.shape().end());
  return torch::from_blob(view.data(), sizes, torch::TensorOptions().dtype(type));
}

TensorView view_of(const torch::Tensor& tensor) {
  if (!tensor.defined()) detail::fail("view_of: the tensor is undefined");
  if (!tensor.device().is_cpu()) {
    detail::fail("view_of: the tensor is on ", tensor.device().str(), ", not the CPU");
  }
  if (!tensor.is_contiguous()) {
    detail::fail("view_of: the tensor of sizes ", tensor.sizes(),
                 " is not contiguous; call .contiguous() first");
  }
  if (tensor.dim() > kMaxRank) {
    detail::fail("view_of: rank ", tensor.dim(), " exceeds ", kMaxRank);
  }
  std::vector<std::uint64_t> dims(tensor.sizes().begin(), tensor.sizes().end());
  return TensorView(tensor.data_ptr(), from_torch_dtype(tensor.scalar_type()),
                    Shape(dims.data(), static_cast<int>(dims.size())));
}

}  // namespace edgefuse
