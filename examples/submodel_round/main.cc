// Example: one FedRolex round over a small Llama-shaped bf16 target. Four clients of
// different capacity get rolling-window sub-models (whole KV groups, a hidden slice shared by
// every layer, an MLP slice, a subset of layers), "train" them (here: add a fixed delta), and
// the server scatters their deltas back by coverage. Prints each client's plan size, the
// coverage report, and checks one element against the rule by hand: it moves by the mean of
// the deltas of the clients whose plans cover it.
//
//   ./example_submodel_round
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "edgefuse/edgefuse.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/plan/policies.h"

namespace ef = edgefuse;

int main() {
  // 1. The target: hidden 64, 8 query heads sharing 4 KV heads (head_dim 8), MLP 128,
  //    vocabulary 100, 4 layers; bf16 values 0.5 everywhere (any values would do).
  ef::ModelConfig cfg;
  cfg.hidden = 64;
  cfg.heads = 8;
  cfg.kv_heads = 4;
  cfg.head_dim = 8;
  cfg.intermediate = 128;
  cfg.vocab = 100;
  cfg.layers = 4;
  const ef::Schema schema = ef::Schema::preset("llama", cfg);
  const auto metas = ef::llama_tensor_metas(cfg, ef::DType::kBF16);
  std::vector<ef::NamedTensor> target;
  for (const auto& m : metas) {
    ef::Tensor t = ef::Tensor::empty(m.dtype, m.shape);
    for (std::uint64_t i = 0; i < m.shape.numel(); ++i)
      t.view().data_as<ef::BFloat16>()[i] = ef::to_bf16(0.5f);
    target.push_back({m.name, std::move(t)});
  }
  const ef::ModelLayout layout = schema.bind(metas);

  // 2. Plans for round 7: FedRolex windows at rates 1/4, 1/4, 1/2, 1, staggered on the hidden
  //    axis so the round's union covers the most; layers: stride over half the depth.
  const int round = 7;
  const std::vector<ef::Rational> rates{{1, 4}, {1, 4}, {1, 2}, {1, 1}};
  const auto offsets = ef::stagger_offsets(cfg.hidden, rates);
  ef::Aggregator agg(layout, {ef::AggregateMode::kDelta});
  std::vector<std::vector<ef::NamedTensor>> updates;
  float delta_sum = 0.0f;  // deltas of the clients holding hidden index 0
  int holders = 0;
  for (std::size_t c = 0; c < rates.size(); ++c) {
    const std::string r = rates[c].to_string();
    const std::string json =
        "{\"hidden\": {\"policy\": \"fedrolex\", \"rate\": \"" + r +
        "\", \"round\": " + std::to_string(round) + ", \"offset\": " + std::to_string(offsets[c]) +
        "}," + "\"kv_heads\": {\"policy\": \"fedrolex\", \"rate\": \"" + r +
        "\", \"round\": " + std::to_string(round) + "}," +
        "\"mlp\": {\"policy\": \"fedrolex\", \"rate\": \"" + r +
        "\", \"round\": " + std::to_string(round) + "}," +
        "\"layers\": {\"policy\": \"stride\", \"rate\": \"" + (c < 3 ? "1/2" : "1") + "\"}}";
    const ef::Plan plan = ef::parse_plan(json, layout, "client" + std::to_string(c));
    // 3. Extract the client's model (f32 for training) and "train": delta = 0.01 * (c + 1).
    auto local = ef::extract(ef::views_of(target), layout, plan, ef::DType::kF32);
    std::uint64_t params = 0;
    for (auto& t : local) {
      float* x = t.tensor.view().data_as<float>();
      for (std::uint64_t i = 0; i < t.tensor.numel(); ++i) x[i] = 0.01f * static_cast<float>(c + 1);
      params += t.tensor.numel();
    }
    std::printf("client %zu: rate %s, %zu tensors, %llu params, hidden %s\n", c, r.c_str(),
                local.size(), static_cast<unsigned long long>(params),
                ef::plan_to_json(ef::Plan{{{"hidden", plan.axes.at("hidden")}}, {}}).c_str());
    for (auto h : plan.axes.at("hidden")) {
      if (h == 0) {
        delta_sum += 0.01f * static_cast<float>(c + 1);
        ++holders;
      }
    }
    updates.push_back(std::move(local));
    agg.add(ef::views_of(updates.back()), plan, 1.0f, "client" + std::to_string(c));
  }

  // 4. Aggregate (delta mode, server lr 1) and print the coverage report.
  std::vector<ef::TensorCoverage> report;
  const auto fused = agg.finalize(ef::views_of(target), &report);
  std::uint64_t covered = 0, total = 0;
  for (const auto& r : report) {
    covered += r.covered;
    total += r.elements;
  }
  std::printf("coverage: %llu of %llu elements (%.1f%%)\n",
              static_cast<unsigned long long>(covered), static_cast<unsigned long long>(total),
              100.0 * static_cast<double>(covered) / static_cast<double>(total));
  for (const auto& r : report) {
    if (r.name.rfind("model.layers.0.mlp", 0) == 0 ||
        r.name.rfind("model.layers.1.mlp.up", 0) == 0) {
      std::printf("  %-34s %5.1f%% covered, %u..%u contributors\n", r.name.c_str(),
                  100.0 * r.fraction(), r.min_contributors, r.max_contributors);
    }
  }
  // The final norm's element 0 lives on hidden index 0: it moves by the mean delta of the
  // clients whose hidden window holds index 0 (unit weights), rounded once to bf16.
  const float got = ef::to_f32(fused[fused.size() - 2].tensor.view().data_as<ef::BFloat16>()[0]);
  const float want = ef::to_f32(ef::to_bf16(0.5f + delta_sum / static_cast<float>(holders)));
  std::printf("model.norm.weight[0]: 0.5 -> %g (%d clients hold it; expected %g): %s\n", got,
              holders, want, got == want ? "ok" : "MISMATCH");
  return got == want ? 0 : 1;
}
