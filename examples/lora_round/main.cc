// Example: one federated LoRA round on sub-models of a small Llama-shaped target. Two clients
// of different capacity get HeteroFL sub-models (prefix rates 1/2 and 1), train LoRA adapters
// of different ranks on their q_proj (here: fixed factors), and the server lifts each adapter
// through its plan onto the target's rows and columns, stacks them with FLoRA (exact), and
// merges the result into the target. Checks one element by hand: it moves by
// Σ p_k·s_k·(B_k·A_k)[0][0]. Then FedEx-LoRA on the same clients: FedIT's averaged factors plus
// the exact residual merged into the base give the same weight.
//
//   ./example_lora_round
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "edgefuse/edgefuse.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/federated.h"

namespace ef = edgefuse;

int main() {
  // 1. The target: hidden 32, 4 heads of 8, MLP 64, vocabulary 50, 2 layers; f32 values 0.5.
  ef::ModelConfig cfg;
  cfg.hidden = 32;
  cfg.heads = 4;
  cfg.kv_heads = 4;
  cfg.head_dim = 8;
  cfg.intermediate = 64;
  cfg.vocab = 50;
  cfg.layers = 2;
  const auto metas = ef::llama_tensor_metas(cfg, ef::DType::kF32);
  const ef::ModelLayout layout = ef::Schema::preset("llama", cfg).bind(metas);
  std::vector<ef::NamedTensor> target;
  for (const auto& m : metas) {
    ef::Tensor t = ef::Tensor::empty(m.dtype, m.shape);
    for (std::uint64_t i = 0; i < t.numel(); ++i) t.view().data_as<float>()[i] = 0.5f;
    target.push_back({m.name, std::move(t)});
  }

  // 2. Two clients: HeteroFL rate 1/2 (rank 2) and rate 1 (rank 4); alpha = 2r, so s = 2.
  //    Each "trains" a LoRA on layer 0's q_proj of its own sub-model.
  const char* plans[] = {R"({"hidden": {"policy": "heterofl", "rate": 0.5},
                             "heads": {"policy": "heterofl", "rate": 0.5},
                             "kv_heads": {"policy": "heterofl", "rate": 0.5}})",
                         R"({})"};
  const std::uint64_t ranks[] = {2, 4};
  const double weights[] = {100, 300};  // sample counts
  std::vector<ef::LoraAdapter> lifted;
  double expected = 0;
  for (int c = 0; c < 2; ++c) {
    const ef::Plan plan = ef::parse_plan(plans[c], layout, "client" + std::to_string(c));
    ef::Shape q_shape;
    for (const auto& t : ef::client_tensors(layout, plan)) {
      if (t.name == "model.layers.0.self_attn.q_proj.weight") q_shape = t.shape;
    }
    const std::uint64_t r = ranks[c], out = q_shape[0], in = q_shape[1];
    ef::Tensor a = ef::Tensor::empty(ef::DType::kF32, ef::Shape{r, in});
    ef::Tensor b = ef::Tensor::empty(ef::DType::kF32, ef::Shape{out, r});
    for (std::uint64_t i = 0; i < a.numel(); ++i)
      a.view().data_as<float>()[i] = 0.01f * static_cast<float>((i + c) % 5);
    for (std::uint64_t i = 0; i < b.numel(); ++i)
      b.view().data_as<float>()[i] = 0.02f * static_cast<float>((i + 2 * c) % 3);
    ef::LoraAdapter sub;
    sub.label = "client" + std::to_string(c);
    sub.modules.push_back(ef::make_lora_module("model.layers.0.self_attn.q_proj", a.view(),
                                               b.view(), 2.0, sub.label));
    std::printf("client %d: q_proj %s, LoRA rank %llu\n", c, q_shape.to_string().c_str(),
                static_cast<unsigned long long>(r));
    // Element [0][0] of the client's s·B·A, weighted by p_k, by hand.
    double dot = 0;
    for (std::uint64_t k = 0; k < r; ++k) {
      dot += double{b.view().data_as<float>()[k]} * a.view().data_as<float>()[k * in];
    }
    expected += weights[c] / 400.0 * 2.0 * dot;
    // 3. Lift through the plan onto the target's rows (B) and columns (A).
    lifted.push_back(ef::lift_adapter(sub, layout, plan));
  }

  // 4. FLoRA: stack the lifted adapters (exact weighted sum), merge into the target.
  const auto round = ef::federated_lora(ef::FederatedRule::kFlora,
                                        {{&lifted[0], weights[0]}, {&lifted[1], weights[1]}});
  const ef::LoraModule& m = round.global.modules.at(0);
  std::printf("FLoRA aggregate: module %s, rank %llu, exact: %s\n", m.module.c_str(),
              static_cast<unsigned long long>(m.rank()), round.exact ? "yes" : "no");
  // 5. FedEx-LoRA on the same clients: they keep FedIT's averaged factors, and the server
  //    merges the exact residual into its copy of the weight: base + residual + B̄Ā equals the
  //    FLoRA result.
  const auto fedex = ef::federated_lora(ef::FederatedRule::kFedExLora,
                                        {{&lifted[0], weights[0]}, {&lifted[1], weights[1]}});
  ef::Tensor fedex_w = ef::Tensor::empty(ef::DType::kF32, m.weight_shape());
  for (const auto& t : target) {
    if (t.name == m.weight_name())
      std::memcpy(fedex_w.view().bytes(), t.tensor.view().bytes(), t.tensor.nbytes());
  }
  ef::merge_lora(fedex_w.view(), fedex.residual.modules.at(0));
  ef::merge_lora(fedex_w.view(), fedex.global.modules.at(0));

  for (auto& t : target) {
    if (t.name == m.weight_name()) ef::merge_lora(t.tensor.view(), m);
  }
  for (const auto& t : target) {
    if (t.name != m.weight_name()) continue;
    const float got = t.tensor.view().data_as<float>()[0];
    const bool ok = std::fabs(got - (0.5 + expected)) < 1e-6;
    std::printf("q_proj[0][0]: 0.5 -> %.6f (expected %.6f): %s\n", got, 0.5 + expected,
                ok ? "ok" : "MISMATCH");
    double worst = 0;
    for (std::uint64_t i = 0; i < t.tensor.numel(); ++i) {
      worst = std::max(worst, std::fabs(double{fedex_w.view().data_as<float>()[i]} -
                                        t.tensor.view().data_as<float>()[i]));
    }
    const bool same = worst < 1e-6;
    std::printf(
        "FedEx-LoRA: residual of rank %llu, base + residual + FedIT average = the FLoRA "
        "weight to %.1e: %s\n",
        static_cast<unsigned long long>(fedex.residual.modules.at(0).rank()), worst,
        same ? "ok" : "MISMATCH");
    return ok && same ? 0 : 1;
  }
  return 1;
}
