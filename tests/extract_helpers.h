// Shared helpers of the schema, plan, extraction and aggregation tests.
#pragma once

#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/extract/extract.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse_test {

// A Llama-style config (num_hidden_layers last, as the spec tables list them).
inline edgefuse::ModelConfig llama_config(std::uint64_t hidden, std::uint64_t heads,
                                          std::uint64_t kv_heads, std::uint64_t head_dim,
                                          std::uint64_t intermediate, std::uint64_t vocab,
                                          std::uint64_t layers) {
  edgefuse::ModelConfig c;
  c.hidden = hidden;
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.intermediate = intermediate;
  c.vocab = vocab;
  c.layers = layers;
  return c;
}

inline edgefuse::NamedTensor f32_tensor(std::string name, edgefuse::Shape shape,
                                        const std::vector<float>& values) {
  auto t = edgefuse::Tensor::empty(edgefuse::DType::kF32, shape);
  float* p = t.view().data_as<float>();
  for (std::size_t i = 0; i < values.size() && i < shape.numel(); ++i) p[i] = values[i];
  return {std::move(name), std::move(t)};
}

inline std::vector<float> values_of(const edgefuse::Tensor& t) {
  const float* p = t.view().data_as<float>();
  return std::vector<float>(p, p + t.numel());
}

inline std::vector<edgefuse::TensorMeta> metas_of(const std::vector<edgefuse::NamedTensor>& ts) {
  std::vector<edgefuse::TensorMeta> m;
  for (const auto& t : ts) m.push_back({t.name, t.tensor.dtype(), t.tensor.shape()});
  return m;
}

// The golden matrix: W[i][j] = 10 i + j, 4 x 6.
inline std::vector<float> golden_w() {
  std::vector<float> w(24);
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 6; ++j) w[i * 6 + j] = static_cast<float>(10 * i + j);
  }
  return w;
}

inline const char* kMatrixSchema =
    R"({"axes": {"out": {"size": 4}, "in": {"size": 6}}, "tensors": {"w": ["out", "in"]}})";

// A client of the golden matrix: the extracted block plus a per-element delta function.
template <typename F>
std::vector<edgefuse::NamedTensor> client_of(const std::vector<edgefuse::NamedTensor>& target,
                                             const edgefuse::ModelLayout& layout,
                                             const edgefuse::Plan& plan, F delta) {
  auto local = edgefuse::extract(edgefuse::views_of(target), layout, plan);
  for (auto& t : local) {
    float* p = t.tensor.view().data_as<float>();
    for (std::size_t i = 0; i < t.tensor.numel(); ++i) p[i] += delta(i);
  }
  return local;
}

}  // namespace edgefuse_test
