// Shape bookkeeping and the aligned storage of Tensor.
#include "edgefuse/core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace edgefuse {

Shape::Shape(std::initializer_list<std::uint64_t> dims)
    : Shape(dims.begin(), static_cast<int>(dims.size())) {}

Shape::Shape(const std::uint64_t* dims, int rank) {
  if (rank < 0 || rank > kMaxRank) {
    detail::fail("Shape: rank ", rank, " is outside [0, ", kMaxRank, "]");
  }
  rank_ = rank;
  numel_ = 1;
  for (int i = 0; i < rank; ++i) {
    dims_[static_cast<std::size_t>(i)] = dims[i];
    if (__builtin_mul_overflow(numel_, dims[i], &numel_)) {
      detail::fail("Shape: the element count of ", to_string(), " overflows 64 bits");
    }
  }
}

std::string Shape::to_string() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) {
    if (i) s += ", ";
    s += std::to_string(dims_[static_cast<std::size_t>(i)]);
  }
  return s + "]";
}

bool operator==(const Shape& a, const Shape& b) noexcept {
  if (a.rank_ != b.rank_) return false;
  for (int i = 0; i < a.rank_; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

Tensor::Tensor(DType dtype, const Shape& shape, bool zero) {
  const std::uint64_t nbytes = dtype_bytes(dtype, shape.numel());
  void* p = nullptr;
  if (nbytes != 0) {
    // aligned_alloc wants a size that is a multiple of the alignment.
    const std::uint64_t padded =
        (nbytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
    if (padded < nbytes) detail::fail("Tensor: ", nbytes, " bytes cannot be allocated");
    p = std::aligned_alloc(kTensorAlignment, static_cast<std::size_t>(padded));
    if (p == nullptr) {
      detail::fail("Tensor: allocating ", nbytes, " bytes for a ", dtype_name(dtype),
                   " tensor of shape ", shape.to_string(), " failed");
    }
    if (zero) std::memset(p, 0, static_cast<std::size_t>(padded));
  }
  view_ = TensorView(p, dtype, shape);
}

Tensor Tensor::zeros(DType dtype, const Shape& shape) { return Tensor(dtype, shape, true); }
Tensor Tensor::empty(DType dtype, const Shape& shape) { return Tensor(dtype, shape, false); }

Tensor::Tensor(Tensor&& other) noexcept : view_(std::exchange(other.view_, TensorView{})) {}

Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this != &other) {
    std::free(view_.data());
    view_ = std::exchange(other.view_, TensorView{});
  }
  return *this;
}

Tensor::~Tensor() { std::free(view_.data()); }

Tensor Tensor::clone() const {
  Tensor t = empty(dtype(), shape());
  if (nbytes() != 0) std::memcpy(t.view_.data(), view_.data(), static_cast<std::size_t>(nbytes()));
  return t;
}

}  // namespace edgefuse
