// Tests for edgefuse/interop/torch.h. Torch comes first: glog's CHECK must not replace
// doctest's (see the developers' guide).
#include "edgefuse/interop/torch.h"

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "edgefuse/kernels/accumulate.h"

using namespace edgefuse;

TEST_CASE("as_torch and view_of share memory both ways") {
  Tensor t = Tensor::zeros(DType::kBF16, {2, 3});
  t.view().data_as<BFloat16>()[4] = to_bf16(2.5f);
  torch::Tensor tt = as_torch(t.view());
  CHECK((tt.scalar_type() == torch::kBFloat16));
  CHECK((tt.sizes() == torch::IntArrayRef({2, 3})));
  CHECK(tt[1][1].item<float>() == 2.5f);
  tt[0][0] = 7.0f;
  CHECK(to_f32(t.view().data_as<BFloat16>()[0]) == 7.0f);
  TensorView back = view_of(tt);
  CHECK(back.data() == t.view().data());
  CHECK(back.shape() == Shape{2, 3});
}

TEST_CASE("kernels on a torch tensor's view match torch's own arithmetic") {
  torch::manual_seed(0);
  torch::Tensor acc = torch::randn({1000});
  torch::Tensor x = torch::randn({1000}).to(torch::kBFloat16);
  torch::Tensor expected = acc + 0.5f * x.to(torch::kFloat);
  accumulate(view_of(acc).data_as<float>(), view_of(x).data_as<BFloat16>(), 1000, 0.5f);
  CHECK(torch::equal(acc, expected));
}

TEST_CASE("view_of rejects non-contiguous tensors and unsupported dtypes") {
  torch::Tensor m = torch::zeros({4, 5});
  CHECK_THROWS_WITH_AS(view_of(m.t()),
                       "view_of: the tensor of sizes [5, 4] is not contiguous; call .contiguous() first",
                       Error);
  CHECK_THROWS_WITH_AS(view_of(torch::zeros({2}, torch::kComplexFloat)),
                       "from_torch_dtype: torch type ComplexFloat has no safetensors dtype", Error);
  CHECK_THROWS_WITH_AS(to_torch_dtype(DType::kF8E4M3),
                       "to_torch_dtype: F8_E4M3 has no LibTorch 1.13 scalar type", Error);
  CHECK(from_torch_dtype(to_torch_dtype(DType::kF16)) == DType::kF16);
}
