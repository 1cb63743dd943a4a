// LibTorch bridges (edgefuse/interop/torch.h).
#include "edgefuse/interop/torch.h"

#include <vector>

namespace edgefuse {

torch::ScalarType to_torch_dtype(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return torch::kBool;
    case DType::kU8:
      return torch::kUInt8;
    case DType::kI8:
      return torch::kInt8;
    case DType::kI16:
      return torch::kInt16;
    case DType::kI32:
      return torch::kInt32;
    case DType::kI64:
      return torch::kInt64;
    case DType::kF16:
      return torch::kHalf;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kF32:
      return torch::kFloat;
    case DType::kF64:
      return torch::kDouble;
    default:
      break;
  }
  detail::fail("to_torch_dtype: ", dtype_name(dtype), " has no LibTorch 1.13 scalar type");
}

DType from_torch_dtype(torch::ScalarType type) {
  switch (type) {
    case torch::kBool:
      return DType::kBool;
    case torch::kUInt8:
      return DType::kU8;
    case torch::kInt8:
      return DType::kI8;
    case torch::kInt16:
      return DType::kI16;
    case torch::kInt32:
      return DType::kI32;
    case torch::kInt64:
      return DType::kI64;
    case torch::kHalf:
      return DType::kF16;
    case torch::kBFloat16:
      return DType::kBF16;
    case torch::kFloat:
      return DType::kF32;
    case torch::kDouble:
      return DType::kF64;
    default:
      break;
  }
  detail::fail("from_torch_dtype: torch type ", c10::toString(type), " has no safetensors dtype");
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

NamedViews views_of(const StateDict& state) {
  NamedViews out;
  out.reserve(state.size());
  for (const auto& item : state) out.push_back({item.key(), view_of(item.value())});
  return out;
}

StateDict state_dict_of(torch::nn::Module& module) {
  StateDict out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out.insert(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out.insert(b.key(), b.value());
  return out;
}

std::vector<TensorMeta> tensor_metas(const StateDict& state) {
  std::vector<TensorMeta> out;
  for (const auto& item : state) {
    const TensorView v = view_of(item.value());
    out.push_back({item.key(), v.dtype(), v.shape()});
  }
  return out;
}

StateDict extract_state_dict(const NamedViews& target, const ModelLayout& layout, const Plan& plan,
                             std::optional<DType> dtype) {
  StateDict out;
  for (auto& t : extract(target, layout, plan, dtype)) {
    auto owner = std::make_shared<Tensor>(std::move(t.tensor));
    const TensorView v = owner->view();
    std::vector<std::int64_t> sizes(v.shape().begin(), v.shape().end());
    torch::Tensor tt = torch::from_blob(
        v.data(), sizes, [owner](void*) mutable { owner.reset(); },
        torch::TensorOptions().dtype(to_torch_dtype(v.dtype())));
    out.insert(t.name, std::move(tt));
  }
  return out;
}

void load_state_dict(torch::nn::Module& module, const StateDict& state, bool strict) {
  StateDict mine = state_dict_of(module);
  torch::NoGradGuard no_grad;
  for (const auto& item : state) {
    torch::Tensor* dst = mine.find(item.key());
    if (dst == nullptr)
      detail::fail("load_state_dict: the module has no tensor '", item.key(), "'");
    if (!dst->sizes().equals(item.value().sizes())) {
      detail::fail("load_state_dict: tensor '", item.key(), "' has sizes ", item.value().sizes(),
                   " but the module's has ", dst->sizes());
    }
    dst->copy_(item.value());
  }
  if (strict) {
    for (const auto& item : mine) {
      if (!state.contains(item.key())) {
        detail::fail("load_state_dict: tensor '", item.key(), "' of the module was not given");
      }
    }
  }
}

std::vector<TensorCoverage> finalize_in_place(Aggregator& aggregator, const StateDict& target) {
  const NamedViews views = views_of(target);
  std::vector<TensorView> out;
  for (const auto& t : aggregator.layout().tensors()) {
    const torch::Tensor* tt = target.find(t.meta.name);
    if (tt == nullptr)
      detail::fail("finalize_in_place: the target lacks tensor '", t.meta.name, "'");
    out.push_back(view_of(*tt));
  }
  torch::NoGradGuard no_grad;
  return aggregator.finalize(views, out);
}

}  // namespace edgefuse
