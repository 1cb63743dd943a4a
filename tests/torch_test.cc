// Tests for edgefuse/interop/torch.h. Torch comes first: glog's CHECK must not replace
// doctest's (see the developers' guide).
#include "edgefuse/interop/torch.h"

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstring>

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
  CHECK_THROWS_WITH_AS(
      view_of(m.t()),
      "view_of: the tensor of sizes [5, 4] is not contiguous; call .contiguous() first", Error);
  CHECK_THROWS_WITH_AS(view_of(torch::zeros({2}, torch::kComplexFloat)),
                       "from_torch_dtype: torch type ComplexFloat has no safetensors dtype", Error);
  CHECK_THROWS_WITH_AS(to_torch_dtype(DType::kF8E4M3),
                       "to_torch_dtype: F8_E4M3 has no LibTorch 1.13 scalar type", Error);
  CHECK(from_torch_dtype(to_torch_dtype(DType::kF16)) == DType::kF16);
}

// A two-layer MLP module: extract a HeteroFL sub-model into a smaller module, take a training
// step there, and aggregate it back into the big module in place; the result equals the
// library path on plain tensors bit for bit.
namespace {
struct Mlp : torch::nn::Module {
  Mlp(std::int64_t in, std::int64_t hidden, std::int64_t out)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, out))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
}  // namespace

TEST_CASE("extract into a smaller module, train it, aggregate back into the module in place") {
  torch::manual_seed(0);
  auto big = std::make_shared<Mlp>(6, 8, 3);
  auto state = edgefuse::state_dict_of(*big);
  const auto layout =
      edgefuse::Schema::mlp(edgefuse::tensor_metas(state)).bind(edgefuse::tensor_metas(state));
  const auto plan = edgefuse::parse_plan(
      R"({"hidden0": {"policy": "fedrolex", "rate": 0.5, "round": 6}})", layout, "plan.json");
  CHECK(plan.axes.at("hidden0") == std::vector<std::uint32_t>{6, 7, 0, 1});
  auto small_state = edgefuse::extract_state_dict(edgefuse::views_of(state), layout, plan);
  auto small = std::make_shared<Mlp>(6, 4, 3);
  edgefuse::load_state_dict(*small, small_state);
  // Local row 0 of fc1 is target row 6.
  CHECK(torch::equal(small->fc1->weight[0], big->fc1->weight[6]));
  CHECK(torch::equal(small->fc2->weight.select(1, 1), big->fc2->weight.select(1, 7)));
  // One SGD step on random data.
  torch::optim::SGD opt(small->parameters(), 0.1);
  const auto x = torch::randn({16, 6});
  const auto y = torch::randint(0, 3, {16});
  opt.zero_grad();
  torch::nn::functional::cross_entropy(small->forward(x), y).backward();
  opt.step();
  // The library on copies of the same tensors.
  std::vector<edgefuse::NamedTensor> before;
  for (const auto& item : state) {
    edgefuse::Tensor t =
        edgefuse::Tensor::empty(edgefuse::DType::kF32, edgefuse::view_of(item.value()).shape());
    std::memcpy(t.view().bytes(), item.value().data_ptr(), t.nbytes());
    before.push_back({item.key(), std::move(t)});
  }
  const auto small_now = edgefuse::state_dict_of(*small);
  edgefuse::Aggregator ref(layout);
  edgefuse::Aggregator agg(layout);
  std::vector<edgefuse::NamedTensor> copies;
  for (const auto& item : small_now) {
    edgefuse::Tensor t =
        edgefuse::Tensor::empty(edgefuse::DType::kF32, edgefuse::view_of(item.value()).shape());
    std::memcpy(t.view().bytes(), item.value().data_ptr(), t.nbytes());
    copies.push_back({item.key(), std::move(t)});
  }
  ref.add(edgefuse::views_of(copies), plan, 1.0f, "copies");
  const auto want = ref.finalize(edgefuse::views_of(before));
  agg.add(edgefuse::views_of(small_now), plan, 1.0f, "module");
  const auto report = edgefuse::finalize_in_place(agg, state);
  CHECK(report.size() == 4);
  CHECK(report[0].covered == 4 * 6);  // fc1.weight: 4 of 8 rows
  for (const auto& w : want) {
    const torch::Tensor got = state[w.name];
    CHECK(std::memcmp(got.data_ptr(), w.tensor.view().bytes(), w.tensor.nbytes()) == 0);
  }
  // The module itself changed (in place), only in the covered rows.
  CHECK(torch::equal(big->fc1->weight[6], small->fc1->weight[0]));
  CHECK(torch::equal(big->fc1->weight[2],
                     torch::from_blob(before[0].tensor.view().data_as<float>() + 2 * 6, {6})));
  CHECK_THROWS_WITH_AS(edgefuse::load_state_dict(*small, state),
                       doctest::Contains("has sizes [8, 6]"), edgefuse::Error);
}
