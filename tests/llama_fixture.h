// The aggregation tests' Llama-shaped fixture: a small GQA model, five sub-model clients of
// different plans with random updates, and the independent gathering of each element's client
// values from index maps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/plan/policies.h"
#include "extract_helpers.h"
#include "reference.h"

namespace edgefuse_test {

using namespace edgefuse;

// A small Llama-shaped model (GQA 8 heads / 4 KV heads, 3 layers) with random bf16 values,
// some of them -0.
struct Llama {
  ModelConfig cfg;
  std::vector<NamedTensor> target;
  std::unique_ptr<ModelLayout> layout;
  explicit Llama(DType dtype = DType::kBF16, std::uint32_t seed = 1,
                 ModelConfig config = edgefuse_test::llama_config(32, 8, 4, 4, 48, 40, 3))
      : cfg(std::move(config)) {
    const Schema s = Schema::preset("llama", cfg);
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (const auto& m : llama_tensor_metas(cfg, dtype)) {
      Tensor t = Tensor::empty(dtype, m.shape);
      for (std::uint64_t i = 0; i < m.shape.numel(); ++i) {
        const float v = (i % 17 == 3) ? -0.0f : nd(rng);
        if (dtype == DType::kBF16) {
          t.view().data_as<BFloat16>()[i] = BFloat16{edgefuse_test::ref_to_bf16(v)};
        } else {
          t.view().data_as<float>()[i] = v;
        }
      }
      target.push_back({m.name, std::move(t)});
    }
    layout = std::make_unique<ModelLayout>(s.bind(edgefuse_test::metas_of(target)));
  }
};

inline const char* const kLlamaPlans[] = {
    R"({"hidden": {"policy": "fedrolex", "rate": 0.25, "round": 29}, "kv_heads": {"policy": "fedrolex", "rate": 0.5, "round": 3}, "mlp": {"policy": "random", "rate": 0.3, "seed": 5}, "layers": [2, 0]})",
    R"({"hidden": {"policy": "heterofl", "rate": 0.5}, "heads": {"policy": "heterofl", "rate": 0.5}, "mlp": {"policy": "fedrolex", "rate": 0.25, "round": 40, "convention": "backward"}})",
    R"({"hidden": {"policy": "random", "rate": 0.3, "seed": 9}, "kv_heads": [3, 1], "layers": {"policy": "stride", "count": 2}, "aggregate_only": {"vocab": [0, 5, 7, 39]}})",
    R"({"hidden": [31, 0, 7, 8, 9, 10, 2], "mlp": [47, 46, 0], "vocab": {"policy": "fedrolex", "rate": 0.5, "round": 30}})",
    R"({})",
};

inline std::vector<std::string> llama_plans() {
  return {std::begin(kLlamaPlans), std::end(kLlamaPlans)};
}

// Clients' updates: the extracted sub-model plus random deltas (N(0, 0.1) times the client's
// scale, 1 by default), in f32 for even clients and bf16 for odd ones.
inline std::vector<std::vector<NamedTensor>> llama_updates(
    const Llama& m, AggregateMode mode, const std::vector<std::string>& plans = llama_plans(),
    const std::vector<float>& scale = {}) {
  std::vector<std::vector<NamedTensor>> out;
  std::mt19937 rng(77);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  for (std::size_t c = 0; c < plans.size(); ++c) {
    const float s = c < scale.size() ? scale[c] : 1.0f;
    const Plan p = parse_plan(plans[c], *m.layout, "plan" + std::to_string(c));
    auto local = extract(views_of(m.target), *m.layout, p, DType::kF32);
    for (auto& t : local) {
      float* x = t.tensor.view().data_as<float>();
      for (std::size_t i = 0; i < t.tensor.numel(); ++i) {
        x[i] = (mode == AggregateMode::kDelta ? 0.0f : x[i]) + nd(rng) * s;
      }
      if (c % 2 == 1) {
        Tensor b = Tensor::empty(DType::kBF16, t.tensor.shape());
        for (std::size_t i = 0; i < t.tensor.numel(); ++i) {
          b.view().data_as<BFloat16>()[i] = BFloat16{edgefuse_test::ref_to_bf16(x[i])};
        }
        t.tensor = std::move(b);
      }
    }
    out.push_back(std::move(local));
  }
  return out;
}

inline std::vector<NamedTensor> run_llama(const Llama& m,
                                          const std::vector<std::vector<NamedTensor>>& ups,
                                          AggregateOptions opt,
                                          std::vector<TensorCoverage>* rep = nullptr) {
  Aggregator agg(*m.layout, opt);
  for (std::size_t c = 0; c < ups.size(); ++c) {
    agg.add(views_of(ups[c]), parse_plan(kLlamaPlans[c], *m.layout, "p"), 0.5f + c, "c");
  }
  return agg.finalize(views_of(m.target), rep);
}

inline bool same_bytes(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].tensor.nbytes() != b[i].tensor.nbytes() ||
        std::memcmp(a[i].tensor.view().bytes(), b[i].tensor.view().bytes(), a[i].tensor.nbytes()) !=
            0) {
      return false;
    }
  }
  return true;
}

inline float widen_any(const ConstTensorView& v, std::size_t i) {
  if (v.dtype() == DType::kF32) return v.data_as<float>()[i];
  return edgefuse_test::float_of(std::uint32_t{v.data_as<BFloat16>()[i].bits} << 16);
}

// Each target element's value in each client, NaN where the client does not cover it (or
// covers it only to aggregate): the index map (a target of its own flat indices, extracted by
// each plan) says where each value lands. plans[c] is client c's plan.
inline std::vector<std::vector<std::vector<float>>> gathered_by_client(
    const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
    const std::vector<std::string>& plans) {
  Llama idx(DType::kF32);
  for (auto& t : idx.target) {
    float* p = t.tensor.view().data_as<float>();
    for (std::size_t i = 0; i < t.tensor.numel(); ++i) p[i] = static_cast<float>(i);
  }
  std::vector<std::vector<std::vector<float>>> values(m.target.size());
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    values[ti].assign(m.target[ti].tensor.numel(),
                      std::vector<float>(ups.size(), std::numeric_limits<float>::quiet_NaN()));
    for (std::size_t c = 0; c < ups.size(); ++c) {
      const Plan p = parse_plan(plans[c], *m.layout, "p");
      const auto map = extract(views_of(idx.target), *idx.layout, p);
      const auto cts = client_tensors(*m.layout, p);
      for (std::size_t k = 0; k < map.size(); ++k) {
        if (cts[k].target_name != m.target[ti].name) continue;
        const float* where = map[k].tensor.view().data_as<float>();
        std::vector<bool> row_ok;  // aggregate_only rows of the vocabulary are not gathered
        if (auto it = p.aggregate_only.find("vocab");
            it != p.aggregate_only.end() && (m.target[ti].name == "model.embed_tokens.weight" ||
                                             m.target[ti].name == "lm_head.weight")) {
          row_ok.assign(40, false);
          for (auto r : it->second) row_ok[r] = true;
        }
        for (std::size_t e = 0; e < map[k].tensor.numel(); ++e) {
          const auto te = static_cast<std::size_t>(where[e]);
          if (!row_ok.empty() && !row_ok[te / 32]) continue;
          values[ti][te][c] = widen_any(ups[c][k].tensor.view(), e);
        }
      }
    }
  }
  return values;
}

// The same for the clients of kLlamaPlans, each element's values of the clients covering it
// in client order.
inline std::vector<std::vector<std::vector<float>>> gathered_values(
    const Llama& m, const std::vector<std::vector<NamedTensor>>& ups) {
  auto values = gathered_by_client(m, ups, llama_plans());
  for (auto& tensor : values) {
    for (auto& element : tensor) {
      element.erase(
          std::remove_if(element.begin(), element.end(), [](float x) { return std::isnan(x); }),
          element.end());
    }
  }
  return values;
}

}  // namespace edgefuse_test
