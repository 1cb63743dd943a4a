// edgefuse/core/tensor.h — shapes, non-owning tensor views and an owning aligned tensor.
//
// A TensorView is what safetensors stores: a pointer to dense, row-major (C-order), contiguous
// elements of one dtype, with up to kMaxRank dimensions. Views do not own memory; a view of an
// mmap'd checkpoint is read-only (ConstTensorView). Tensor owns 64-byte aligned storage (one
// cache line, one AVX-512 vector) and hands out views. The layout is the one of safetensors and
// of a contiguous torch.Tensor, so interop is zero-copy.
//
//   edgefuse::Tensor t = edgefuse::Tensor::zeros(edgefuse::DType::kF32, {4, 8});
//   float* p = t.view().data_as<float>();   // 32 zeros, 64-byte aligned
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "edgefuse/core/dtype.h"
#include "edgefuse/core/error.h"

namespace edgefuse {

inline constexpr int kMaxRank = 8;
inline constexpr std::size_t kTensorAlignment = 64;

// Up to kMaxRank non-negative dimensions. Rank 0 is a scalar (one element); a zero
// dimension makes an empty tensor. Throws Error on rank > kMaxRank or an element count that
// overflows 64 bits.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::uint64_t> dims);
  Shape(const std::uint64_t* dims, int rank);

  int rank() const noexcept { return rank_; }
  std::uint64_t operator[](int i) const noexcept { return dims_[static_cast<std::size_t>(i)]; }
  const std::uint64_t* begin() const noexcept { return dims_.data(); }
  const std::uint64_t* end() const noexcept { return dims_.data() + rank_; }
  // Product of the dimensions (1 for rank 0), checked when the shape was built.
  std::uint64_t numel() const noexcept { return numel_; }
  // "[4, 8]"
  std::string to_string() const;

  friend bool operator==(const Shape& a, const Shape& b) noexcept;
  friend bool operator!=(const Shape& a, const Shape& b) noexcept { return !(a == b); }

 private:
  std::array<std::uint64_t, kMaxRank> dims_{};
  int rank_ = 0;
  std::uint64_t numel_ = 1;
};

// Non-owning view of contiguous elements. Byte is std::byte (TensorView, writable) or
// const std::byte (ConstTensorView); a TensorView converts implicitly to a ConstTensorView.
template <typename Byte>
class BasicTensorView {
 public:
  using VoidPtr = std::conditional_t<std::is_const_v<Byte>, const void*, void*>;

  BasicTensorView() = default;
  // Throws Error if data is null while the view holds elements, or the byte size overflows.
  BasicTensorView(VoidPtr data, DType dtype, const Shape& shape)
      : data_(static_cast<Byte*>(data)),
        dtype_(dtype),
        shape_(shape),
        nbytes_(dtype_bytes(dtype, shape.numel())) {
    if (data_ == nullptr && nbytes_ != 0) {
      detail::fail("TensorView: null data for a ", dtype_name(dtype), " tensor of shape ",
                   shape.to_string());
    }
  }
  template <typename B = Byte, typename = std::enable_if_t<std::is_const_v<B>>>
  BasicTensorView(const BasicTensorView<std::byte>& v)  // NOLINT: implicit by design
      : data_(v.bytes()), dtype_(v.dtype()), shape_(v.shape()), nbytes_(v.nbytes()) {}

  Byte* bytes() const noexcept { return data_; }
  VoidPtr data() const noexcept { return data_; }
  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  int rank() const noexcept { return shape_.rank(); }
  std::uint64_t numel() const noexcept { return shape_.numel(); }
  std::uint64_t nbytes() const noexcept { return nbytes_; }

  // Typed pointer; throws Error if T is not this view's dtype.
  template <typename T>
  auto data_as() const -> std::conditional_t<std::is_const_v<Byte>, const T*, T*> {
    if (dtype_of<T> != dtype_) {
      detail::fail("TensorView::data_as: view holds ", dtype_name(dtype_), ", asked for ",
                   dtype_name(dtype_of<T>));
    }
    return reinterpret_cast<std::conditional_t<std::is_const_v<Byte>, const T*, T*>>(data_);
  }

 private:
  Byte* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Shape shape_{};
  std::uint64_t nbytes_ = 0;
};

using TensorView = BasicTensorView<std::byte>;
using ConstTensorView = BasicTensorView<const std::byte>;

// Owning tensor with 64-byte aligned storage. Move-only; clone() copies explicitly.
class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor. Throws Error on a bad shape or a failed allocation.
  static Tensor zeros(DType dtype, const Shape& shape);
  // Uninitialised storage, for buffers that are written before they are read.
  static Tensor empty(DType dtype, const Shape& shape);

  Tensor(Tensor&& other) noexcept;
  Tensor& operator=(Tensor&& other) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor();

  Tensor clone() const;
  TensorView view() noexcept { return view_; }
  ConstTensorView view() const noexcept { return view_; }
  DType dtype() const noexcept { return view_.dtype(); }
  const Shape& shape() const noexcept { return view_.shape(); }
  std::uint64_t numel() const noexcept { return view_.numel(); }
  std::uint64_t nbytes() const noexcept { return view_.nbytes(); }

 private:
  Tensor(DType dtype, const Shape& shape, bool zero);
  TensorView view_{};
};

}  // namespace edgefuse
