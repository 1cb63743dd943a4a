// Tests for edgefuse/core/tensor.h.
#include "edgefuse/core/tensor.h"

#include <doctest/doctest.h>

#include <cstdint>
#include <utility>

using namespace edgefuse;

TEST_CASE("shape counts elements, prints itself and rejects rank above 8 or overflow") {
  const Shape s{4, 8, 2};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 64);
  CHECK(s.to_string() == "[4, 8, 2]");
  CHECK(Shape{}.numel() == 1);
  CHECK(Shape{3, 0}.numel() == 0);
  CHECK(Shape{1, 2} == Shape{1, 2});
  CHECK(Shape{1, 2} != Shape{2, 1});
  const std::uint64_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  CHECK_THROWS_WITH_AS(Shape(nine, 9), "Shape: rank 9 is outside [0, 8]", Error);
  CHECK_THROWS_WITH_AS((Shape{std::uint64_t{1} << 40, std::uint64_t{1} << 30}),
                       "Shape: the element count of [1099511627776, 1073741824] overflows 64 bits",
                       Error);
}

TEST_CASE("tensor views check their dtype and their data pointer") {
  float data[6] = {1, 2, 3, 4, 5, 6};
  TensorView v(data, DType::kF32, {2, 3});
  CHECK(v.nbytes() == 24);
  CHECK(v.data_as<float>()[5] == 6.0f);
  CHECK_THROWS_WITH_AS(v.data_as<BFloat16>(), "TensorView::data_as: view holds F32, asked for BF16",
                       Error);
  ConstTensorView c = v;
  CHECK(c.data_as<float>() == data);
  CHECK_THROWS_WITH_AS(TensorView(nullptr, DType::kBF16, {2}),
                       "TensorView: null data for a BF16 tensor of shape [2]", Error);
  CHECK_NOTHROW(TensorView(nullptr, DType::kBF16, {0, 5}));
}

TEST_CASE("owning tensors are 64-byte aligned, zeroed, movable and clonable") {
  Tensor t = Tensor::zeros(DType::kBF16, {3, 5});
  CHECK(reinterpret_cast<std::uintptr_t>(t.view().data()) % 64 == 0);
  CHECK(t.nbytes() == 30);
  const auto* p = t.view().data_as<BFloat16>();
  for (int i = 0; i < 15; ++i) CHECK(p[i].bits == 0);
  t.view().data_as<BFloat16>()[7].bits = 0x3F80;
  Tensor c = t.clone();
  CHECK(c.view().data_as<BFloat16>()[7].bits == 0x3F80);
  CHECK(c.view().data() != t.view().data());
  Tensor m = std::move(t);
  CHECK(m.view().data_as<BFloat16>()[7].bits == 0x3F80);
  CHECK(t.view().data() == nullptr);  // NOLINT: moved-from is empty by contract
  CHECK(Tensor::empty(DType::kF32, {0}).view().data() == nullptr);
  CHECK_THROWS_AS(Tensor::zeros(DType::kF4, {3}), Error);
}
