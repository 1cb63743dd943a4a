// Extraction and coverage aggregation against every golden vector (the 4 x 6 matrix W[i][j] = 10 i
// + j).
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/tile_memory.h"

#include <doctest/doctest.h>

#include <cstring>
#include <map>
#include <random>
#include <tuple>

#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/scatter.h"
#include "edgefuse/kernels/server_step.h"
#include "edgefuse/plan/policies.h"
#include "extract_helpers.h"
#include "llama_fixture.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::client_of;
using edgefuse_test::f32_tensor;
using edgefuse_test::gathered_values;
using edgefuse_test::golden_w;
using edgefuse_test::kLlamaPlans;
using edgefuse_test::Llama;
using edgefuse_test::llama_updates;
using edgefuse_test::run_llama;
using edgefuse_test::same_bytes;
using edgefuse_test::values_of;
using edgefuse_test::widen_any;

namespace {

struct Matrix {
  std::vector<NamedTensor> target;
  ModelLayout layout;
  Matrix()
      : target(make()),
        layout(Schema::from_json(edgefuse_test::kMatrixSchema, "matrix.json")
                   .bind(edgefuse_test::metas_of(target))) {}
  static std::vector<NamedTensor> make() {
    std::vector<NamedTensor> t;
    t.push_back(f32_tensor("w", {4, 6}, golden_w()));
    return t;
  }
  Plan plan(const std::string& json) const { return parse_plan(json, layout, "plan.json"); }
};

// Runs one aggregation of (plan, constant or per-element delta, weight) clients.
struct Client {
  std::string plan;
  std::function<float(std::size_t)> delta;
  float weight = 1.0f;
};

std::vector<float> aggregate(const Matrix& m, const std::vector<Client>& clients,
                             AggregateMode mode = AggregateMode::kParams,
                             std::vector<TensorCoverage>* report = nullptr,
                             AggregateOptions opt = {}) {
  opt.mode = mode;
  Aggregator agg(m.layout, opt);
  std::vector<std::vector<NamedTensor>> keep;
  for (std::size_t i = 0; i < clients.size(); ++i) {
    const Plan p = m.plan(clients[i].plan);
    if (mode == AggregateMode::kParams) {
      keep.push_back(client_of(m.target, m.layout, p, clients[i].delta));
    } else {
      auto local = extract(views_of(m.target), m.layout, p);
      for (auto& t : local) {
        float* x = t.tensor.view().data_as<float>();
        for (std::size_t e = 0; e < t.tensor.numel(); ++e) x[e] = clients[i].delta(e);
      }
      keep.push_back(std::move(local));
    }
    agg.add(views_of(keep.back()), p, clients[i].weight, "client" + std::to_string(i));
  }
  auto out = agg.finalize(views_of(m.target), report);
  return values_of(out[0].tensor);
}

std::function<float(std::size_t)> plus(float c) {
  return [c](std::size_t) { return c; };
}

std::vector<std::uint32_t> counts_of(const Matrix& m, const std::vector<std::string>& plans) {
  // Contributors per element, recomputed independently from the plans' lists.
  std::vector<std::uint32_t> c(24, 0);
  for (const auto& pj : plans) {
    const Plan p = m.plan(pj);
    const auto rows = axis_indices(p, m.layout, m.layout.schema().find_axis("out"));
    const auto cols = axis_indices(p, m.layout, m.layout.schema().find_axis("in"));
    for (auto r : rows) {
      for (auto k : cols) ++c[r * 6 + k];
    }
  }
  return c;
}

const char* kA =
    R"({"out": {"policy": "heterofl", "rate": 0.5}, "in": {"policy": "heterofl", "rate": 0.5}})";
const char* kB =
    R"({"out": {"policy": "heterofl", "rate": 1}, "in": {"policy": "heterofl", "rate": 1}})";

}  // namespace

TEST_CASE(
    "tile memory: 12 bytes per element for file clients, 16 with generated rows, at most 64 Ki") {
  CHECK(tile_bytes_per_element(false) == 12);
  CHECK(tile_bytes_per_element(true) == 16);
  CHECK(tile_elements_for(std::uint64_t{1} << 30, 2, false) == kMaxTileElements);
  CHECK(kMaxTileElements == 65536);
  CHECK(tile_elements_for(2 * 12 * 5000 + 11, 2, false) == 5000);
  CHECK(tile_elements_for(16 * 5000, 1, true) == 5000);
  CHECK(tile_elements_for(16 * 5000, 1, false) == 6666);
  CHECK(tile_elements_for(100, 0, false) == 8);  // no thread count: one thread
}

TEST_CASE("aggregate: HeteroFL static prefixes, unweighted") {
  Matrix m;
  std::vector<TensorCoverage> rep;
  const auto w = aggregate(m, {{kA, plus(2)}, {kB, plus(4)}}, AggregateMode::kParams, &rep);
  CHECK(w == std::vector<float>{3,  4,  5,  7,  8,  9,  13, 14, 15, 17, 18, 19,
                                24, 25, 26, 27, 28, 29, 34, 35, 36, 37, 38, 39});
  CHECK(counts_of(m, {kA, kB}) == std::vector<std::uint32_t>{2, 2, 2, 1, 1, 1, 2, 2, 2, 1, 1, 1,
                                                             1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  REQUIRE(rep.size() == 1);
  CHECK(rep[0].covered == 24);
  CHECK(rep[0].min_contributors == 1);
  CHECK(rep[0].max_contributors == 2);
  CHECK(rep[0].fraction() == 1.0);
}

TEST_CASE("aggregate: HeteroFL with sample weights 100 and 300") {
  Matrix m;
  const auto w = aggregate(m, {{kA, plus(2), 100}, {kB, plus(4), 300}});
  CHECK(w == std::vector<float>{3.5, 4.5, 5.5, 7,  8,  9,  13.5, 14.5, 15.5, 17, 18, 19,
                                24,  25,  26,  27, 28, 29, 34,   35,   36,   37, 38, 39});
}

TEST_CASE("aggregate: HeteroFL leaves uncovered elements unchanged") {
  Matrix m;
  const char* kC =
      R"({"out": {"policy": "heterofl", "rate": 0.25}, "in": {"policy": "heterofl", "rate": 0.25}})";
  std::vector<TensorCoverage> rep;
  const auto w = aggregate(m, {{kA, plus(2)}, {kC, plus(6)}}, AggregateMode::kParams, &rep);
  CHECK(w == std::vector<float>{4,  5,  4,  3,  4,  5,  12, 13, 14, 13, 14, 15,
                                20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34, 35});
  CHECK(counts_of(m, {kA, kC}) == std::vector<std::uint32_t>{2, 2, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0,
                                                             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(rep[0].covered == 6);
  CHECK(rep[0].min_contributors == 0);
  CHECK(rep[0].max_contributors == 2);
}

TEST_CASE("aggregate: FedRolex round 3, paper-style and code-style") {
  Matrix m;
  const char* kPa =
      R"({"out": {"policy": "fedrolex", "rate": 0.5, "round": 3}, "in": {"policy": "fedrolex", "rate": 0.5, "round": 3}})";
  const char* kPb =
      R"({"out": {"policy": "fedrolex", "rate": 0.25, "round": 3}, "in": {"policy": "fedrolex", "rate": 0.25, "round": 3}})";
  CHECK(aggregate(m, {{kPa, plus(2)}, {kPb, plus(6)}}) ==
        std::vector<float>{0,  1,  2,  5,  6,  7,  10, 11, 12, 13, 14, 15,
                           20, 21, 22, 23, 24, 25, 30, 31, 32, 37, 38, 37});
  CHECK(counts_of(m, {kPa, kPb}) == std::vector<std::uint32_t>{0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0,
                                                               0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 1});
  const char* kCa =
      R"({"out": {"policy": "fedrolex", "rate": 0.5, "round": 3, "convention": "backward"}, "in": {"policy": "fedrolex", "rate": 0.5, "round": 3, "convention": "backward"}})";
  const char* kCb =
      R"({"out": {"policy": "fedrolex", "rate": 0.25, "round": 3, "convention": "backward"}, "in": {"policy": "fedrolex", "rate": 0.25, "round": 3, "convention": "backward"}})";
  CHECK(aggregate(m, {{kCa, plus(2)}, {kCb, plus(6)}}) ==
        std::vector<float>{0,  1,  2,  3,  4,  5,  10, 11, 12, 17, 18, 17,
                           20, 21, 22, 25, 26, 27, 30, 31, 32, 33, 34, 35});
  CHECK(counts_of(m, {kCa, kCb}) == std::vector<std::uint32_t>{0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 1,
                                                               0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0});
  // Local row 0 of A (paper-style) is target row 3, local row 1 is target row 0.
  const auto local = extract(views_of(m.target), m.layout, m.plan(kPa));
  CHECK(values_of(local[0].tensor) == std::vector<float>{33, 34, 35, 3, 4, 5});
}

TEST_CASE("aggregate: FjORD nested blocks give the weighted HeteroFL case exactly") {
  Matrix m;
  const char* k1 = R"({"out": {"policy": "fjord", "p": 0.4}, "in": {"policy": "fjord", "p": 0.4}})";
  const char* k2 = R"({"out": {"policy": "fjord", "p": 1.0}, "in": {"policy": "fjord", "p": 1.0}})";
  CHECK(m.plan(k1).axes.at("out").size() == 2);
  CHECK(m.plan(k1).axes.at("in").size() == 3);
  CHECK(aggregate(m, {{k1, plus(2), 100}, {k2, plus(4), 300}}) ==
        aggregate(m, {{kA, plus(2), 100}, {kB, plus(4), 300}}));
}

TEST_CASE("aggregate: Federated Dropout with explicit random subsets, constant deltas") {
  Matrix m;
  const char* kRA = R"({"out": [0, 2], "in": [1, 3, 5]})";
  const char* kRB = R"({"out": [1, 2], "in": [0, 1, 2, 3]})";
  CHECK(aggregate(m, {{kRA, plus(2)}, {kRB, plus(6)}}) ==
        std::vector<float>{0,  3,  2,  5,  4,  7,  16, 17, 18, 19, 14, 15,
                           26, 25, 28, 27, 24, 27, 30, 31, 32, 33, 34, 35});
  CHECK(counts_of(m, {kRA, kRB}) == std::vector<std::uint32_t>{0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0,
                                                               1, 2, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0});
}

TEST_CASE("aggregate: non-constant deltas land in list order (params and delta mode)") {
  Matrix m;
  const char* kRA = R"({"out": [0, 2], "in": [1, 3, 5]})";
  const char* kRB = R"({"out": [1, 2], "in": [0, 1, 2, 3]})";
  const std::vector<float> da{1, 2, 3, 4, 5, 6}, db{-1, -2, -3, -4, 10, 20, 30, 40};
  const std::vector<float> want{0,  2,  2,  5,    4,  8,  9,  9,  9,  9,  14, 15,
                                30, 33, 52, 45.5, 24, 31, 30, 31, 32, 33, 34, 35};
  auto fa = [&](std::size_t i) { return da[i]; };
  auto fb = [&](std::size_t i) { return db[i]; };
  CHECK(aggregate(m, {{kRA, fa}, {kRB, fb}}) == want);
  CHECK(aggregate(m, {{kRA, fa}, {kRB, fb}}, AggregateMode::kDelta) == want);
  // The same rows listed in another order move the deltas with them.
  const char* kRA2 = R"({"out": [2, 0], "in": [5, 3, 1]})";
  const std::vector<float> da2{6, 5, 4, 3, 2, 1};
  auto fa2 = [&](std::size_t i) { return da2[i]; };
  CHECK(aggregate(m, {{kRA2, fa2}, {kRB, fb}}, AggregateMode::kDelta) == want);
}

TEST_CASE("delta mode applies the server learning rate to the coverage mean") {
  Matrix m;
  AggregateOptions opt;
  opt.server_lr = 0.5f;
  const auto w = aggregate(m, {{kA, plus(2)}, {kB, plus(4)}}, AggregateMode::kDelta, nullptr, opt);
  auto want = golden_w();
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 6; ++j) want[i * 6 + j] += (i < 2 && j < 3) ? 1.5f : 2.0f;
  }
  CHECK(w == want);
}

TEST_CASE("aggregate: chained MLP: W2's columns follow W1's rows in every method and round") {
  std::vector<NamedTensor> t;
  std::vector<float> w1(24), b1{0.5f, 1.5f, 2.5f, 3.5f}, w2(12), b2{7, 8, 9};
  for (int i = 0; i < 24; ++i) w1[i] = static_cast<float>(i);
  for (int i = 0; i < 12; ++i) w2[i] = static_cast<float>(100 + i);
  t.push_back(f32_tensor("fc1.weight", {4, 6}, w1));
  t.push_back(f32_tensor("fc1.bias", {4}, b1));
  t.push_back(f32_tensor("fc2.weight", {3, 4}, w2));
  t.push_back(f32_tensor("fc2.bias", {3}, b2));
  const auto layout = Schema::mlp(edgefuse_test::metas_of(t)).bind(edgefuse_test::metas_of(t));
  {
    const auto p = parse_plan(R"({"hidden0": {"policy": "heterofl", "rate": 0.5}})", layout, "p");
    const auto c = extract(views_of(t), layout, p);
    REQUIRE(c.size() == 4);
    CHECK(c[0].name == "fc1.weight");
    CHECK(c[0].tensor.shape() == Shape{2, 6});  // the network input is never sliced
    CHECK(values_of(c[0].tensor) == std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
    CHECK(values_of(c[1].tensor) == std::vector<float>{0.5f, 1.5f});
    CHECK(c[2].tensor.shape() == Shape{3, 2});  // classes are never sliced
    CHECK(values_of(c[2].tensor) == std::vector<float>{100, 101, 104, 105, 108, 109});
    CHECK(values_of(c[3].tensor) == b2);
  }
  for (const char* conv : {"forward", "backward"}) {
    for (int r = 0; r < 8; ++r) {
      const std::string pj =
          std::string(R"({"hidden0": {"policy": "fedrolex", "rate": 0.5, "round": )") +
          std::to_string(r) + R"(, "convention": ")" + conv + R"("}})";
      const auto c = extract(views_of(t), layout, parse_plan(pj, layout, "p"));
      // Row i of local W1 starts with 6 * target_row; column j of local W2 is 100 + target_col.
      const auto l1 = values_of(c[0].tensor), l2 = values_of(c[2].tensor);
      for (int i = 0; i < 2; ++i) {
        CHECK(l1[i * 6] / 6 == l2[i] - 100);  // I(W2) == O(W1)
        if (std::string(conv) == "forward") CHECK(l1[i * 6] / 6 == static_cast<float>((r + i) % 4));
      }
    }
  }
}

TEST_CASE("aggregate: depth: per-layer coverage for prefixes and for layer drop") {
  std::vector<NamedTensor> t;
  for (int l = 0; l < 4; ++l) {
    t.push_back(
        f32_tensor("blocks." + std::to_string(l) + ".w", {2, 2}, std::vector<float>(4, 10.0f * l)));
  }
  const auto layout =
      Schema::from_json(R"({"axes": {}, "tensors": {"blocks.{layer}.w": [null, null]}})",
                        "depth.json")
          .bind(edgefuse_test::metas_of(t));
  CHECK(layout.axis_size(layout.schema().find_axis("layers")) == 4);
  auto run = [&](const std::vector<std::pair<std::string, float>>& clients) {
    Aggregator agg(layout);
    std::vector<std::vector<NamedTensor>> keep;
    for (const auto& [pj, d] : clients) {
      const Plan p = parse_plan(pj, layout, "p");
      keep.push_back(client_of(t, layout, p, plus(d)));
      agg.add(views_of(keep.back()), p, 1.0f, pj);
    }
    std::vector<float> first;
    for (const auto& x : agg.finalize(views_of(t))) first.push_back(values_of(x.tensor)[0]);
    return first;
  };
  CHECK(run({{R"({"layers": {"policy": "prefix", "count": 1}})", 3},
             {R"({"layers": {"policy": "prefix", "count": 2}})", 6},
             {R"({"layers": {"policy": "prefix", "rate": 1}})", 9}}) ==
        std::vector<float>{6, 17.5, 29, 39});
  CHECK(run({{R"({"layers": [0, 3]})", 3}, {"{}", 9}}) == std::vector<float>{6, 19, 29, 36});
  // Layer drop renumbers: client layer 1 is target layer 3.
  const auto c = extract(views_of(t), layout, parse_plan(R"({"layers": [0, 3]})", layout, "p"));
  REQUIRE(c.size() == 2);
  CHECK(c[1].name == "blocks.1.w");
  CHECK(values_of(c[1].tensor)[0] == 30.0f);
}

TEST_CASE("aggregate: FIARSE: top-|w| masks and delta aggregation with a negative server rate") {
  const std::vector<float> w{0.5f, -2.0f, 0.1f, 1.5f, -0.3f, 3.0f};
  CHECK(top_magnitude_indices(w.data(), 6, Rational{1, 2}) == std::vector<std::uint32_t>{1, 3, 5});
  CHECK(top_magnitude_indices(w.data(), 6, Rational{1, 3}) == std::vector<std::uint32_t>{1, 5});
  std::vector<NamedTensor> t;
  t.push_back(f32_tensor("w", {6}, w));
  const auto layout =
      Schema::from_json(R"({"axes": {"p": {"size": 6}}, "tensors": {"w": ["p"]}})", "s")
          .bind(edgefuse_test::metas_of(t));
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.server_lr = -1.0f;  // FIARSE applies w -= lr_global * avg(start - end)
  Aggregator agg(layout, opt);
  Plan a, b;
  a.axes["p"] = top_magnitude_indices(w.data(), 6, Rational{1, 2});
  b.axes["p"] = top_magnitude_indices(w.data(), 6, Rational{1, 3});
  std::vector<NamedTensor> da, db;
  da.push_back(f32_tensor("w", {3}, {0.2f, -0.4f, 0.6f}));
  db.push_back(f32_tensor("w", {2}, {0.4f, -0.2f}));
  agg.add(views_of(da), a, 1.0f, "A");
  agg.add(views_of(db), b, 1.0f, "B");
  const auto got = values_of(agg.finalize(views_of(t))[0].tensor);
  const std::vector<double> want{0.5, -2.3, 0.1, 1.9, -0.3, 2.8};
  for (int i = 0; i < 6; ++i) CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-6));
  CHECK(got[0] == 0.5f);  // uncovered: exact
}

TEST_CASE("aggregate: GQA head selection on a llama-preset model") {
  const ModelConfig cfg = edgefuse_test::llama_config(8, 4, 2, 2, 12, 5, 1);
  const Schema s = Schema::preset("llama", cfg);
  std::vector<NamedTensor> t;
  auto enc = [](std::uint64_t rows, std::uint64_t cols) {  // value = 100 row + col
    std::vector<float> v(rows * cols);
    for (std::uint64_t i = 0; i < rows; ++i) {
      for (std::uint64_t j = 0; j < cols; ++j) v[i * cols + j] = static_cast<float>(100 * i + j);
    }
    return v;
  };
  const std::string l = "model.layers.0.";
  t.push_back(f32_tensor("model.embed_tokens.weight", {5, 8}, enc(5, 8)));
  t.push_back(f32_tensor(l + "self_attn.q_proj.weight", {8, 8}, enc(8, 8)));
  t.push_back(f32_tensor(l + "self_attn.k_proj.weight", {4, 8}, enc(4, 8)));
  t.push_back(f32_tensor(l + "self_attn.v_proj.weight", {4, 8}, enc(4, 8)));
  t.push_back(f32_tensor(l + "self_attn.o_proj.weight", {8, 8}, enc(8, 8)));
  t.push_back(f32_tensor(l + "mlp.gate_proj.weight", {12, 8}, enc(12, 8)));
  t.push_back(f32_tensor(l + "mlp.up_proj.weight", {12, 8}, enc(12, 8)));
  t.push_back(f32_tensor(l + "mlp.down_proj.weight", {8, 12}, enc(8, 12)));
  t.push_back(f32_tensor(l + "input_layernorm.weight", {8}, enc(1, 8)));
  t.push_back(f32_tensor(l + "post_attention_layernorm.weight", {8}, enc(1, 8)));
  t.push_back(f32_tensor("model.norm.weight", {8}, enc(1, 8)));
  t.push_back(f32_tensor("lm_head.weight", {5, 8}, enc(5, 8)));
  const auto layout = s.bind(edgefuse_test::metas_of(t));
  auto rows_of = [&](const std::string& pj, const std::string& name) {
    const auto c = extract(views_of(t), layout, parse_plan(pj, layout, "p"));
    for (const auto& x : c) {
      if (x.name != name) continue;
      std::vector<int> rows;
      const auto v = values_of(x.tensor);
      for (std::uint64_t r = 0; r < x.tensor.shape()[0]; ++r) {
        rows.push_back(static_cast<int>(v[r * x.tensor.shape()[1]]) / 100);
      }
      return rows;
    }
    FAIL("no tensor ", name);
    return std::vector<int>{};
  };
  auto cols_of = [&](const std::string& pj, const std::string& name) {
    const auto c = extract(views_of(t), layout, parse_plan(pj, layout, "p"));
    for (const auto& x : c) {
      if (x.name != name) continue;
      std::vector<int> cols;
      const auto v = values_of(x.tensor);
      const auto nc = x.tensor.shape().rank() == 2 ? x.tensor.shape()[1] : x.tensor.shape()[0];
      for (std::uint64_t j = 0; j < nc; ++j) cols.push_back(static_cast<int>(v[j]) % 100);
      return cols;
    }
    FAIL("no tensor ", name);
    return std::vector<int>{};
  };
  const std::string q = l + "self_attn.q_proj.weight", k = l + "self_attn.k_proj.weight",
                    v = l + "self_attn.v_proj.weight", o = l + "self_attn.o_proj.weight";
  // (a) whole groups: group {0}.
  const char* a = R"({"kv_heads": {"policy": "heterofl", "rate": 0.5}})";
  CHECK(rows_of(a, q) == std::vector<int>{0, 1, 2, 3});
  CHECK(rows_of(a, k) == std::vector<int>{0, 1});
  CHECK(rows_of(a, v) == std::vector<int>{0, 1});
  CHECK(cols_of(a, o) == std::vector<int>{0, 1, 2, 3});
  // (b) every KV head, thinner groups: q heads {0, 2}.
  const char* b = R"({"heads": {"policy": "heterofl", "rate": 0.5}})";
  CHECK(rows_of(b, q) == std::vector<int>{0, 1, 4, 5});
  CHECK(rows_of(b, k) == std::vector<int>{0, 1, 2, 3});
  CHECK(cols_of(b, o) == std::vector<int>{0, 1, 4, 5});
  // Hidden d' = 4 and MLP F' = 6, static.
  const char* h =
      R"({"hidden": {"policy": "heterofl", "rate": 0.5}, "mlp": {"policy": "heterofl", "rate": 0.5}})";
  CHECK(cols_of(h, "model.embed_tokens.weight") == std::vector<int>{0, 1, 2, 3});
  CHECK(cols_of(h, q) == std::vector<int>{0, 1, 2, 3});
  CHECK(rows_of(h, o) == std::vector<int>{0, 1, 2, 3});
  CHECK(rows_of(h, l + "mlp.down_proj.weight") == std::vector<int>{0, 1, 2, 3});
  CHECK(cols_of(h, l + "mlp.down_proj.weight") == std::vector<int>{0, 1, 2, 3, 4, 5});
  CHECK(rows_of(h, l + "mlp.gate_proj.weight") == std::vector<int>{0, 1, 2, 3, 4, 5});
  CHECK(cols_of(h, "model.norm.weight") == std::vector<int>{0, 1, 2, 3});
  CHECK(cols_of(h, "lm_head.weight") == std::vector<int>{0, 1, 2, 3});
  CHECK(rows_of(h, "lm_head.weight") == std::vector<int>{0, 1, 2, 3, 4});  // vocab kept
  // Rolling at group granularity, round 1: group {1}.
  const char* r = R"({"kv_heads": {"policy": "fedrolex", "rate": 0.5, "round": 1}})";
  CHECK(rows_of(r, q) == std::vector<int>{4, 5, 6, 7});
  CHECK(rows_of(r, k) == std::vector<int>{2, 3});
  // A query head without its KV head is rejected.
  CHECK_THROWS_WITH_AS(parse_plan(R"({"heads": [0, 1], "kv_heads": [1]})", layout, "bad.json"),
                       doctest::Contains("bad.json: query head 0 (local 0) belongs to KV head 0 "
                                         "but local KV head 0 is target KV head 1"),
                       Error);
  CHECK_THROWS_WITH_AS(
      parse_plan(R"({"heads": [0, 1, 2], "kv_heads": [0, 1]})", layout, "bad.json"),
      doctest::Contains("3 query heads cannot share 2 KV heads"), Error);
}

TEST_CASE("aggregation is bitwise identical for any tile size and thread count") {
  for (auto mode : {AggregateMode::kParams, AggregateMode::kDelta}) {
    Llama m;
    const auto ups = llama_updates(m, mode);
    AggregateOptions opt;
    opt.mode = mode;
    opt.server_lr = 0.75f;
    set_num_threads(1);
    const auto ref = run_llama(m, ups, opt);
    for (std::size_t threads : {1, 2, 3}) {
      set_num_threads(threads);
      for (std::size_t rows : {1, 3, 7, 64}) {
        CAPTURE(threads);
        CAPTURE(rows);
        opt.tile_rows = rows;
        CHECK(same_bytes(run_llama(m, ups, opt), ref));
      }
      opt.tile_rows = 0;
      opt.tile_elements = 100;
      CHECK(same_bytes(run_llama(m, ups, opt), ref));
      opt.tile_elements = 0;
    }
    set_num_threads(0);
  }
}

TEST_CASE("add_rows clients (rows made on demand) and compute_rows equal add and finalize") {
  Llama m;
  const auto ups = llama_updates(m, AggregateMode::kDelta);
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.server_lr = 0.75f;
  std::vector<TensorCoverage> want_report;
  const auto want = run_llama(m, ups, opt, &want_report);
  // Odd clients give their (bf16) values as F32 rows from a source; the others are held.
  auto build = [&](AggregateOptions o) {
    Aggregator agg(*m.layout, o);
    for (std::size_t c = 0; c < ups.size(); ++c) {
      const Plan p = parse_plan(kLlamaPlans[c], *m.layout, "p");
      if (c % 2 == 0) {
        agg.add(views_of(ups[c]), p, 0.5f + c, "c");
        continue;
      }
      std::map<std::size_t, ConstTensorView> local;
      const auto cts = client_tensors(*m.layout, p);
      for (std::size_t k = 0; k < cts.size(); ++k)
        local[cts[k].target_index] = ups[c][k].tensor.view();
      agg.add_rows(p, 0.5f + c, "c",
                   [local](std::size_t ti, const std::uint32_t* rows, std::size_t n,
                           std::size_t row_len, float* dst) {
                     const ConstTensorView& v = local.at(ti);
                     for (std::size_t r = 0; r < n; ++r) {
                       for (std::size_t j = 0; j < row_len; ++j)
                         dst[r * row_len + j] = widen_any(v, rows[r] * row_len + j);
                     }
                   });
    }
    return agg;
  };
  for (std::size_t threads : {1, 2}) {
    set_num_threads(threads);
    Aggregator agg = build(opt);
    std::vector<TensorCoverage> rep;
    CHECK(same_bytes(agg.finalize(views_of(m.target), &rep), want));
    // compute_rows over uneven row blocks, tiles of 2 rows.
    AggregateOptions o2 = opt;
    o2.tile_rows = 2;
    Aggregator by_rows = build(o2);
    bool same = true;
    for (std::size_t ti = 0; ti < m.layout->tensors().size(); ++ti) {
      const auto& meta = m.layout->tensors()[ti].meta;
      const std::uint64_t rows = meta.shape.rank() >= 2 ? meta.shape[0] : 1;
      const std::size_t row_bytes = static_cast<std::size_t>(m.target[ti].tensor.nbytes() / rows);
      std::vector<std::byte> out(m.target[ti].tensor.nbytes());
      for (std::uint64_t r0 = 0; r0 < rows; r0 += 3) {
        const std::uint64_t r1 = std::min<std::uint64_t>(rows, r0 + 3);
        by_rows.compute_rows(ti, m.target[ti].tensor.view().bytes() + r0 * row_bytes, r0, r1,
                             out.data() + r0 * row_bytes);
      }
      same = same && std::memcmp(out.data(), want[ti].tensor.view().bytes(), out.size()) == 0;
    }
    CHECK(same);
    REQUIRE(by_rows.report().size() == want_report.size());
    for (std::size_t i = 0; i < want_report.size(); ++i) {
      CHECK(by_rows.report()[i].covered == want_report[i].covered);
      CHECK(by_rows.report()[i].min_contributors == want_report[i].min_contributors);
      CHECK(by_rows.report()[i].max_contributors == want_report[i].max_contributors);
    }
    CHECK_THROWS_WITH(by_rows.compute_rows(0, m.target[0].tensor.view().bytes(), 2, 1, nullptr),
                      "compute_rows: rows [2, 1) of 'model.embed_tokens.weight' with 40 rows");
  }
  set_num_threads(0);
}

TEST_CASE("aggregation equals an independent scalar recomputation from gathered index maps") {
  // Extracting a target whose values are their own flat indices gives, for each client
  // element, the target element it came from; the reference then sums in f32 in client order
  // (bitwise) and in double (within one bf16 rounding).
  Llama m;
  Llama idx(DType::kF32);
  for (auto& t : idx.target) {
    float* p = t.tensor.view().data_as<float>();
    for (std::size_t i = 0; i < t.tensor.numel(); ++i) p[i] = static_cast<float>(i);
  }
  const auto ups = llama_updates(m, AggregateMode::kDelta);
  AggregateOptions opt;
  opt.mode = AggregateMode::kDelta;
  opt.server_lr = 0.75f;
  std::vector<TensorCoverage> rep;
  const auto out = run_llama(m, ups, opt, &rep);
  std::uint64_t checked = 0;
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto& name = m.target[ti].name;
    const std::size_t n = m.target[ti].tensor.numel();
    std::vector<float> acc(n, 0.0f), wsum(n, 0.0f);
    std::vector<double> dacc(n, 0.0), dw(n, 0.0);
    std::vector<std::uint32_t> cnt(n, 0);
    for (std::size_t c = 0; c < ups.size(); ++c) {
      const Plan p = parse_plan(kLlamaPlans[c], *m.layout, "p");
      const auto map = extract(views_of(idx.target), *idx.layout, p);
      const auto cts = client_tensors(*m.layout, p);
      const float w = 0.5f + c;
      for (std::size_t k = 0; k < map.size(); ++k) {
        const auto& ct = cts[k];
        if (ct.target_name != name) continue;
        const float* where = map[k].tensor.view().data_as<float>();
        const ConstTensorView x = ups[c][k].tensor.view();
        // aggregate_only on vocab: rows of embed/lm_head outside the list are not counted.
        std::vector<bool> row_ok;
        if (auto it = p.aggregate_only.find("vocab");
            it != p.aggregate_only.end() &&
            (name == "model.embed_tokens.weight" || name == "lm_head.weight")) {
          row_ok.assign(40, false);
          for (auto r : it->second) row_ok[r] = true;
        }
        for (std::size_t e = 0; e < map[k].tensor.numel(); ++e) {
          const auto te = static_cast<std::size_t>(where[e]);
          if (!row_ok.empty() && !row_ok[te / 32]) continue;
          acc[te] += w * widen_any(x, e);
          wsum[te] += w;
          dacc[te] += double(w) * widen_any(x, e);
          dw[te] += w;
          ++cnt[te];
        }
      }
    }
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    const auto* got = out[ti].tensor.view().data_as<BFloat16>();
    std::uint64_t covered = 0;
    std::uint32_t mx = 0, mn = UINT32_MAX;
    for (std::size_t e = 0; e < n; ++e) {
      const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
      std::uint16_t want = base[e].bits;
      if (wsum[e] > 0) {
        volatile float q = acc[e] / wsum[e];
        volatile float inc = 0.75f * q;
        if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(b + inc);
        const double exact = b + 0.75 * (dacc[e] / dw[e]);
        CHECK(std::fabs(edgefuse_test::float_of(std::uint32_t{got[e].bits} << 16) - exact) <=
              std::fabs(exact) * 0x1p-8 + 1e-6);
      }
      CAPTURE(name);
      CAPTURE(e);
      REQUIRE(got[e].bits == want);
      covered += cnt[e] > 0;
      mx = std::max(mx, cnt[e]);
      mn = std::min(mn, cnt[e]);
      ++checked;
    }
    CAPTURE(name);
    CHECK(rep[ti].name == name);
    CHECK(rep[ti].covered == covered);
    CHECK(rep[ti].max_contributors == mx);
    CHECK(rep[ti].min_contributors == mn);
  }
  CHECK(checked == 3 * (32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3 + 64) + 40 * 32 * 2 + 32);
}

// The scalar reference of a robust rule over one element's values: sorted with -0 before +0;
// the median halves before adding; the trimmed mean sums in f32 in sorted order.
float reference_robust(std::vector<float> v, RobustRule rule, double beta) {
  std::sort(v.begin(), v.end(), [](float a, float b) {
    return a < b || (a == b && std::signbit(a) && !std::signbit(b));
  });
  const std::size_t c = v.size();
  if (rule == RobustRule::kMedian) {
    return c % 2 ? v[(c - 1) / 2] : 0.5f * v[c / 2 - 1] + 0.5f * v[c / 2];
  }
  const auto t = static_cast<std::size_t>(std::floor(beta * static_cast<double>(c)));
  float sum = 0.0f;
  for (std::size_t i = t; i < c - t; ++i) sum += v[i];
  return sum / static_cast<float>(c - 2 * t);
}

TEST_CASE("robust aggregates equal a scalar median and trimmed mean of each element's clients") {
  // Five sub-model clients of different plans: 0 to 5 of them cover an element.
  Llama m;
  for (const AggregateMode mode : {AggregateMode::kDelta, AggregateMode::kParams}) {
    const auto ups = llama_updates(m, mode);
    const auto values = gathered_values(m, ups);
    struct Rule {
      RobustRule rule;
      double beta;
    };
    for (const Rule r : {Rule{RobustRule::kMedian, 0.0}, Rule{RobustRule::kTrimmedMean, 0.2},
                         Rule{RobustRule::kTrimmedMean, 0.34}}) {
      CAPTURE(mode == AggregateMode::kDelta);
      CAPTURE(static_cast<int>(r.rule));
      CAPTURE(r.beta);
      AggregateOptions opt;
      opt.mode = mode;
      opt.server_lr = 0.75f;
      opt.robust = RobustAggregate{r.rule, r.beta};
      std::vector<TensorCoverage> rep;
      const auto out = run_llama(m, ups, opt, &rep);
      std::uint64_t moved = 0, by_several = 0;
      for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
        const auto& name = m.target[ti].name;
        CAPTURE(name);
        const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
        const auto* got = out[ti].tensor.view().data_as<BFloat16>();
        std::uint64_t covered = 0;
        std::uint32_t most = 0;
        for (std::size_t e = 0; e < values[ti].size(); ++e) {
          CAPTURE(e);
          const auto& v = values[ti][e];
          std::uint16_t want = base[e].bits;
          if (!v.empty()) {
            const float robust = reference_robust(v, r.rule, r.beta);
            if (mode == AggregateMode::kParams) {
              want = edgefuse_test::ref_to_bf16(robust);
            } else {
              const float b = edgefuse_test::float_of(std::uint32_t{base[e].bits} << 16);
              volatile float inc = 0.75f * robust;
              if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(b + inc);
            }
            ++covered;
            by_several += v.size() >= 3;
            most = std::max(most, static_cast<std::uint32_t>(v.size()));
          }
          REQUIRE(got[e].bits == want);
          moved += got[e].bits != base[e].bits;
        }
        CHECK(rep[ti].covered == covered);
        CHECK(rep[ti].max_contributors == most);
      }
      CHECK(moved > 10000);
      CHECK(by_several > 1000);
      // Any tile size and thread count: the same bytes.
      for (const std::size_t threads : {1, 3}) {
        const ScopedNumThreads scoped(threads);
        AggregateOptions small = opt;
        small.tile_rows = 3;
        CHECK(same_bytes(run_llama(m, ups, small), out));
      }
    }
  }
  AggregateOptions bad;
  bad.robust = RobustAggregate{RobustRule::kTrimmedMean, 0.5};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, bad),
                       "aggregate: the trimmed mean's beta = 0.5 is outside [0, 0.5)", Error);
  bad.robust->beta = 0.2;
  bad.finite_check = FiniteCheck::kWhileFusing;
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, bad),
                       "aggregate: a robust aggregate needs FiniteCheck::kOnAdd (values are "
                       "gathered as they are, so a NaN could not be told from an element the "
                       "client does not cover)",
                       Error);
}

TEST_CASE("the weighted median of each element's clients: their values repeated by weight") {
  // Weights 0.5 + c: the weighted median equals the median of each value repeated 1 + 2c
  // times (scaling the weights changes nothing).
  Llama m;
  const auto ups = llama_updates(m, AggregateMode::kParams);
  const auto values = edgefuse_test::gathered_by_client(m, ups, edgefuse_test::llama_plans());
  AggregateOptions opt;
  opt.mode = AggregateMode::kParams;
  opt.robust = RobustAggregate{RobustRule::kMedian, 0.0, true};
  const auto out = run_llama(m, ups, opt);
  std::size_t same = 0, elements = 0, differs_from_median = 0;
  for (std::size_t ti = 0; ti < m.target.size(); ++ti) {
    const auto* base = m.target[ti].tensor.view().data_as<BFloat16>();
    const auto* got = out[ti].tensor.view().data_as<BFloat16>();
    for (std::size_t e = 0; e < values[ti].size(); ++e) {
      std::vector<float> repeated, plain;
      for (std::size_t c = 0; c < values[ti][e].size(); ++c) {
        if (std::isnan(values[ti][e][c])) continue;
        plain.push_back(values[ti][e][c]);
        for (std::size_t t = 0; t < 1 + 2 * c; ++t) repeated.push_back(values[ti][e][c]);
      }
      std::uint16_t want = base[e].bits;
      if (!repeated.empty()) {
        const float r = reference_robust(repeated, RobustRule::kMedian, 0.0);
        want = edgefuse_test::ref_to_bf16(r);
        differs_from_median += r != reference_robust(plain, RobustRule::kMedian, 0.0) ? 1 : 0;
      }
      same += got[e].bits == want ? 1 : 0;
      ++elements;
    }
  }
  CHECK(same == elements);
  CHECK(differs_from_median > 1000);
  for (const std::size_t threads : {1, 3}) {
    const ScopedNumThreads scoped(threads);
    AggregateOptions small = opt;
    small.tile_rows = 3;
    CHECK(same_bytes(run_llama(m, ups, small), out));
  }
  opt.robust = RobustAggregate{RobustRule::kTrimmedMean, 0.2, true};
  CHECK_THROWS_WITH_AS(Aggregator(*m.layout, opt), "aggregate: only the median has a weighted form",
                       Error);
}

TEST_CASE("extract, a zero delta and aggregate give the target back bit for bit") {
  for (auto dtype : {DType::kBF16, DType::kF32}) {
    Llama m(dtype);
    Aggregator agg(*m.layout, {AggregateMode::kDelta});
    std::vector<std::vector<NamedTensor>> keep;
    for (std::size_t c = 0; c < std::size(kLlamaPlans); ++c) {
      const Plan p = parse_plan(kLlamaPlans[c], *m.layout, "p");
      auto local = extract(views_of(m.target), *m.layout, p);
      for (auto& t : local) std::memset(t.tensor.view().bytes(), 0, t.tensor.nbytes());
      keep.push_back(std::move(local));
      agg.add(views_of(keep.back()), p, 1.0f + c, "zero");
    }
    CHECK(same_bytes(agg.finalize(views_of(m.target)), m.target));
  }
  // Params mode with one client returning its block unchanged (weight 1): also exact.
  Llama m;
  Aggregator agg(*m.layout);
  const Plan p = parse_plan(kLlamaPlans[0], *m.layout, "p");
  auto local = extract(views_of(m.target), *m.layout, p);
  agg.add(views_of(local), p, 1.0f, "same");
  CHECK(same_bytes(agg.finalize(views_of(m.target)), m.target));
}

TEST_CASE("in-place finalize into the target's own memory equals the out-of-place result") {
  Llama m;
  const auto ups = llama_updates(m, AggregateMode::kParams);
  const auto ref = run_llama(m, ups, {});
  Aggregator agg(*m.layout);
  for (std::size_t c = 0; c < ups.size(); ++c) {
    agg.add(views_of(ups[c]), parse_plan(kLlamaPlans[c], *m.layout, "p"), 0.5f + c, "c");
  }
  std::vector<TensorView> out;
  for (auto& t : m.target) out.push_back(t.tensor.view());
  agg.finalize(views_of(m.target), out);
  CHECK(same_bytes(m.target, ref));
}

TEST_CASE("bad client updates are rejected by name and the others are still fused") {
  Matrix m;
  const Plan pa = m.plan(kA);
  auto good = client_of(m.target, m.layout, pa, plus(2));
  Aggregator agg(m.layout);
  agg.add(views_of(good), pa, 1.0f, "good.safetensors");
  // Missing and extra tensors.
  CHECK_THROWS_WITH_AS(agg.add({}, pa, 1.0f, "empty.safetensors"),
                       "empty.safetensors: tensor 'w' is missing (the plan gives it shape [2, 3])",
                       Error);
  auto extra = client_of(m.target, m.layout, pa, plus(1));
  extra.push_back(f32_tensor("w2", {1}, {1}));
  CHECK_THROWS_WITH_AS(
      agg.add(views_of(extra), pa, 1.0f, "extra.safetensors"),
      "extra.safetensors: tensor 'w2' is not part of this client's plan (extra tensor)", Error);
  // Shaped differently from what the plan implies.
  std::vector<NamedTensor> wrong;
  wrong.push_back(f32_tensor("w", {3, 2}, std::vector<float>(6, 1)));
  CHECK_THROWS_WITH_AS(agg.add(views_of(wrong), pa, 1.0f, "shape.safetensors"),
                       "shape.safetensors: tensor 'w' has shape [3, 2] but the plan gives [2, 3]",
                       Error);
  // Non-finite values.
  auto nan = client_of(m.target, m.layout, pa, plus(1));
  nan[0].tensor.view().data_as<float>()[4] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(
      agg.add(views_of(nan), pa, 1.0f, "nan.safetensors"),
      "nan.safetensors: tensor 'w' holds a non-finite value at element 4 (client rejected)", Error);
  // Weights.
  CHECK_THROWS_WITH_AS(agg.add(views_of(good), pa, -1.0f, "neg"),
                       "neg: client weight -1 is negative or not finite", Error);
  CHECK_THROWS_AS(agg.add(views_of(good), pa, std::nanf(""), "nan-w"), Error);
  // Plans: out of range, duplicated, unknown axis.
  Plan bad = pa;
  bad.axes["out"] = {0, 4};
  CHECK_THROWS_WITH_AS(agg.add(views_of(good), bad, 1.0f, "c9"),
                       "c9: plan: axis 'out': index 4 at position 1 is out of range (axis size 4)",
                       Error);
  bad.axes["out"] = {1, 1};
  CHECK_THROWS_WITH_AS(agg.add(views_of(good), bad, 1.0f, "c9"),
                       "c9: plan: axis 'out': index 1 appears twice (again at position 1)", Error);
  CHECK_THROWS_WITH_AS(m.plan(R"({"heads": [0]})"),
                       "plan.json: axis 'heads': not an axis of the schema (axes: in, out)", Error);
  CHECK(agg.num_clients() == 1);
  const auto w = values_of(agg.finalize(views_of(m.target))[0].tensor);
  CHECK(w[0] == 2.0f);  // the good client alone: W + 2 in its block
  CHECK(w[3] == 3.0f);  // uncovered
  // Zero weights and no clients.
  Aggregator zero(m.layout);
  zero.add(views_of(good), pa, 0.0f, "z");
  CHECK_THROWS_WITH_AS(zero.finalize(views_of(m.target)),
                       "aggregate: the client weights are all zero", Error);
  Aggregator none(m.layout);
  CHECK_THROWS_WITH_AS(none.finalize(views_of(m.target)), "aggregate: no client update was added",
                       Error);
}

TEST_CASE("a non-finite value in a bf16 update is found wherever it is") {
  Llama m;
  const Plan p = parse_plan(kLlamaPlans[1], *m.layout, "p");
  for (std::size_t pos : {0, 1, 1023, 1024, 1500}) {
    auto local = extract(views_of(m.target), *m.layout, p);
    auto& t = local[0].tensor;  // embed_tokens, 40 x 16
    REQUIRE(t.numel() > 600);
    const std::size_t at = pos % t.numel();
    t.view().data_as<BFloat16>()[at].bits = 0x7FC0;  // NaN
    Aggregator agg(*m.layout);
    CHECK_THROWS_WITH_AS(
        agg.add(views_of(local), p, 1.0f, "u"),
        ("u: tensor 'model.embed_tokens.weight' holds a non-finite value at element " +
         std::to_string(at) + " (client rejected)")
            .c_str(),
        Error);
  }
}

TEST_CASE("the first faulty tensor in plan order is reported, whichever check it fails") {
  Llama m;
  const Plan p = parse_plan(kLlamaPlans[1], *m.layout, "p");
  const auto clean = extract(views_of(m.target), *m.layout, p);
  REQUIRE(clean.size() > 6);
  auto nan_at = [](std::vector<NamedTensor>& v, std::size_t i, std::size_t e) {
    if (v[i].tensor.dtype() == DType::kBF16) {
      v[i].tensor.view().data_as<BFloat16>()[e].bits = 0xFF80;  // -Inf
    } else {
      v[i].tensor.view().data_as<float>()[e] = std::numeric_limits<float>::quiet_NaN();
    }
  };
  auto misshape = [](std::vector<NamedTensor>& v, std::size_t i) {
    v[i] = f32_tensor(v[i].name, {v[i].tensor.numel() + 1},
                      std::vector<float>(v[i].tensor.numel() + 1, 0.0f));
  };
  for (std::size_t threads : {1, 2, 3}) {
    CAPTURE(threads);
    set_num_threads(threads);
    Aggregator agg(*m.layout);
    auto u = extract(views_of(m.target), *m.layout, p);
    nan_at(u, 2, 1);
    misshape(u, 5);
    CHECK_THROWS_WITH_AS(
        agg.add(views_of(u), p, 1.0f, "u"),
        ("u: tensor '" + u[2].name + "' holds a non-finite value at element 1 (client rejected)")
            .c_str(),
        Error);
    u = extract(views_of(m.target), *m.layout, p);
    misshape(u, 2);
    nan_at(u, 5, 0);
    CHECK_THROWS_WITH_AS(agg.add(views_of(u), p, 1.0f, "u"),
                         doctest::Contains(("u: tensor '" + u[2].name + "' has shape [").c_str()),
                         Error);
    CHECK(agg.num_clients() == 0);
  }
  set_num_threads(0);
  // A tensor scanned in several pieces: the element is counted from the tensor's start, and
  // the lowest of two hits in different pieces wins.
  std::vector<NamedTensor> target;
  target.push_back(f32_tensor("big", {700, 1000}, std::vector<float>(700000, 0.5f)));
  const ModelLayout layout =
      Schema::from_json(R"({"axes": {"r": {"size": 700}}, "tensors": {"big": ["r", null]}})",
                        "s.json")
          .bind(edgefuse_test::metas_of(target));
  Plan whole;
  auto up = extract(views_of(target), layout, whole);
  up[0].tensor.view().data_as<float>()[612345] = -std::numeric_limits<float>::infinity();
  up[0].tensor.view().data_as<float>()[699999] = std::numeric_limits<float>::quiet_NaN();
  for (std::size_t threads : {1, 2, 3}) {
    set_num_threads(threads);
    Aggregator agg(layout);
    CHECK_THROWS_WITH_AS(agg.add(views_of(up), whole, 1.0f, "big.safetensors"),
                         "big.safetensors: tensor 'big' holds a non-finite value at element 612345 "
                         "(client rejected)",
                         Error);
    up[0].tensor.view().data_as<float>()[262143] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH_AS(agg.add(views_of(up), whole, 1.0f, "big.safetensors"),
                         "big.safetensors: tensor 'big' holds a non-finite value at element 262143 "
                         "(client rejected)",
                         Error);
    up[0].tensor.view().data_as<float>()[262143] = 0.5f;
  }
  set_num_threads(0);
}

namespace {
// The scalar loop scatter_accumulate must equal: sources in order, each row's runs in order,
// every product (weight times value scale, times the value) rounded to f32 before it is added.
// value_of(k, e) is element e of source k.
template <typename ValueOf>
void ref_scatter(const ScatterSource* sources, std::size_t n, std::size_t row_len, ValueOf value_of,
                 std::vector<float>& acc, std::vector<float>& wsum,
                 std::vector<std::uint32_t>& count) {
  for (std::size_t k = 0; k < n; ++k) {
    const ScatterSource& s = sources[k];
    for (std::size_t r = 0; r < s.num_rows; ++r) {
      for (std::size_t q = 0; q < s.num_runs; ++q) {
        for (std::size_t j = 0; j < s.runs[q].len; ++j) {
          const std::size_t d = s.dst_rows[r] * row_len + s.runs[q].dst + j;
          volatile float wx = s.weight * s.value_scale;
          volatile float prod = wx * value_of(k, s.src_rows[r] * s.x_row_len + s.runs[q].src + j);
          acc[d] += prod;
          wsum[d] += s.weight;
          count[d] += 1;
        }
      }
    }
  }
}

// One random scatter source's data: x_rows * x_row_len values of its dtype (f32 in x32,
// 16-bit patterns in x16) and a random subset of the tile's rows (each kept unless
// rng() % skip == 0), drawn in that order.
struct ScatterData {
  DType dtype;
  std::vector<float> x32;
  std::vector<BFloat16> x16;
  std::vector<std::uint32_t> dst, src;
  ScatterData(std::mt19937& rng, DType dt, std::size_t x_rows, std::size_t x_row_len,
              std::size_t tile_rows, unsigned skip)
      : dtype(dt), x32(x_rows * x_row_len), x16(x_rows * x_row_len) {
    std::uniform_real_distribution<float> ud(-2.0f, 2.0f);
    for (std::size_t i = 0; i < x32.size(); ++i) {
      x32[i] = ud(rng);
      x16[i] = dt == DType::kBF16 ? BFloat16{edgefuse_test::ref_to_bf16(ud(rng))}
                                  : BFloat16{edgefuse_test::ref_to_f16(ud(rng))};
    }
    for (std::uint32_t r = 0; r < tile_rows; ++r) {
      if (rng() % skip != 0) {
        dst.push_back(r);
        src.push_back(static_cast<std::uint32_t>(rng() % x_rows));
      }
    }
  }
  ScatterSource source(std::size_t x_rows, std::size_t x_row_len,
                       const std::vector<ScatterRun>& runs, float weight,
                       float value_scale = 1.0f) const {
    const void* x = dtype == DType::kF32 ? static_cast<const void*>(x32.data()) : x16.data();
    return {x,          dtype,       x_rows,      x_row_len, dst.data(), src.data(),
            dst.size(), runs.data(), runs.size(), weight,    value_scale};
  }
  // Element e as f32, decoded independently of the library.
  float value(std::size_t e) const {
    const std::uint16_t b = x16[e].bits;
    return dtype == DType::kF32    ? x32[e]
           : dtype == DType::kBF16 ? edgefuse_test::float_of(std::uint32_t{b} << 16)
                                   : edgefuse_test::float_of(edgefuse_test::ref_f16_to_f32_bits(b));
  }
};
}  // namespace

TEST_CASE("scatter_accumulate equals the scalar loop on every SIMD target") {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> ud(-2.0f, 2.0f);
  const std::size_t tile_rows = 9, row_len = 77;
  std::vector<float> x32(11 * 50);
  std::vector<BFloat16> x16(11 * 50);
  for (std::size_t i = 0; i < x32.size(); ++i) {
    x32[i] = ud(rng);
    x16[i] = BFloat16{edgefuse_test::ref_to_bf16(ud(rng))};
  }
  const std::vector<ScatterRun> runs_a{{0, 10, 1}, {3, 0, 33}, {40, 33, 17}, {70, 2, 7}};
  const std::vector<ScatterRun> runs_b{{1, 0, 50}, {51, 0, 26}};
  const std::vector<std::uint32_t> dst_a{0, 2, 3, 8}, src_a{10, 0, 4, 4};
  const std::vector<std::uint32_t> dst_b{2, 5, 6}, src_b{1, 1, 0};
  const ScatterSource sources[] = {
      {x32.data(), DType::kF32, 11, 50, dst_a.data(), src_a.data(), 4, runs_a.data(), 4, 0.75f},
      {x16.data(), DType::kBF16, 11, 50, dst_b.data(), src_b.data(), 3, runs_b.data(), 2, 3.0f},
  };
  std::vector<float> ref_acc(tile_rows * row_len, 0.5f), ref_w(tile_rows * row_len, 0.25f);
  std::vector<std::uint32_t> ref_c(tile_rows * row_len, 1);
  ref_scatter(
      sources, 2, row_len,
      [&](std::size_t k, std::size_t e) {
        return k == 0 ? x32[e] : edgefuse_test::float_of(std::uint32_t{x16[e].bits} << 16);
      },
      ref_acc, ref_w, ref_c);
  edgefuse_test::for_each_simd_target([&](const std::string& target) {
    CAPTURE(target);
    std::vector<float> acc(tile_rows * row_len, 0.5f), w(tile_rows * row_len, 0.25f);
    std::vector<std::uint32_t> c(tile_rows * row_len, 1);
    scatter_accumulate(acc.data(), w.data(), c.data(), tile_rows, row_len, sources, 2);
    for (std::size_t i = 0; i < acc.size(); ++i) {
      REQUIRE(edgefuse_test::bits_of(acc[i]) == edgefuse_test::bits_of(ref_acc[i]));
      REQUIRE(w[i] == ref_w[i]);
      REQUIRE(c[i] == ref_c[i]);
    }
  });
  // Bad arguments.
  std::vector<float> acc(tile_rows * row_len), w(tile_rows * row_len);
  ScatterSource bad = sources[0];
  bad.weight = -1.0f;
  CHECK_THROWS_WITH_AS(
      scatter_accumulate(acc.data(), w.data(), nullptr, tile_rows, row_len, &bad, 1),
      "scatter_accumulate: sources[0].weight = -1 is negative or not finite", Error);
  bad = sources[0];
  bad.value_scale = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(
      scatter_accumulate(acc.data(), w.data(), nullptr, tile_rows, row_len, &bad, 1),
      "scatter_accumulate: sources[0].value_scale = inf is negative or not finite", Error);
  bad = sources[1];
  const std::vector<std::uint32_t> unsorted{5, 2, 6};
  bad.dst_rows = unsorted.data();
  CHECK_THROWS_WITH_AS(
      scatter_accumulate(acc.data(), w.data(), nullptr, tile_rows, row_len, &bad, 1),
      doctest::Contains("dst_rows[1] = 2 is out of order"), Error);
  bad = sources[1];
  const std::vector<ScatterRun> overlap{{1, 0, 50}, {50, 0, 26}};
  bad.runs = overlap.data();
  CHECK_THROWS_WITH_AS(
      scatter_accumulate(acc.data(), w.data(), nullptr, tile_rows, row_len, &bad, 1),
      doctest::Contains("runs[1] = (dst 50, src 0, len 26) is empty, out of order"), Error);
}

TEST_CASE("scatter_accumulate with many sources and long rows equals the scalar loop") {
  // Rows of 128+ elements go row by row through the sources (groups of 64), shorter ones
  // source by source: both must add in source order per element. 70 random sources of f32,
  // bf16 and f16, each a random sorted subset of the tile's rows and random runs.
  std::mt19937 rng(11);
  for (const std::size_t row_len : {std::size_t{127}, std::size_t{128}, std::size_t{301}}) {
    CAPTURE(row_len);
    const std::size_t tile_rows = 13, x_rows = 17, x_row_len = 2 * row_len;
    std::vector<ScatterData> data;
    std::vector<std::vector<ScatterRun>> runs(70);
    std::vector<ScatterSource> sources;
    for (std::size_t k = 0; k < runs.size(); ++k) {
      const DType dt = k % 3 == 0 ? DType::kF32 : (k % 3 == 1 ? DType::kBF16 : DType::kF16);
      data.emplace_back(rng, dt, x_rows, x_row_len, tile_rows, 3);
      for (std::uint64_t at = rng() % 9; at + 1 < row_len;) {
        const std::uint64_t len = 1 + rng() % std::min<std::uint64_t>(40, row_len - at);
        runs[k].push_back({at, rng() % (x_row_len - len), len});
        at += len + 1 + rng() % 30;
      }
    }
    for (std::size_t k = 0; k < runs.size(); ++k) {  // some values scaled (clipped clients)
      sources.push_back(data[k].source(x_rows, x_row_len, runs[k],
                                       0.125f * static_cast<float>(1 + k % 7),
                                       k % 5 == 2 ? 0.3f + 0.01f * static_cast<float>(k) : 1.0f));
    }
    std::vector<float> ref_acc(tile_rows * row_len, -0.0f), ref_w(tile_rows * row_len, 0.0f);
    std::vector<std::uint32_t> ref_c(tile_rows * row_len, 0);
    ref_scatter(
        sources.data(), sources.size(), row_len,
        [&](std::size_t k, std::size_t e) { return data[k].value(e); }, ref_acc, ref_w, ref_c);
    edgefuse_test::for_each_simd_target([&](const std::string& target) {
      CAPTURE(target);
      for (std::size_t threads : {1, 3}) {
        set_num_threads(threads);
        std::vector<float> acc(tile_rows * row_len, -0.0f), w(tile_rows * row_len, 0.0f);
        std::vector<std::uint32_t> c(tile_rows * row_len, 0);
        scatter_accumulate(acc.data(), w.data(), c.data(), tile_rows, row_len, sources.data(),
                           sources.size());
        for (std::size_t i = 0; i < acc.size(); ++i) {
          REQUIRE(edgefuse_test::bits_of(acc[i]) == edgefuse_test::bits_of(ref_acc[i]));
          REQUIRE(w[i] == ref_w[i]);
          REQUIRE(c[i] == ref_c[i]);
        }
      }
      set_num_threads(0);
    });
  }
}

TEST_CASE("scatter_accumulate adds sources with the same runs together, in order, bit for bit") {
  // Sources in classes of identical runs (the clients of a rolling window that share it),
  // interleaved in source order: classes whose runs are disjoint are added class by class
  // with the sums loaded once per row; classes that overlap (or same runs in another dtype)
  // go source by source. Both must equal the scalar loop bit for bit, over sums that start
  // non-zero, with run lengths around the vector widths, in groups of up to 64 sources.
  std::mt19937 rng(21);
  const std::size_t tile_rows = 11, row_len = 300, x_rows = 9, x_row_len = 120;
  const std::vector<std::vector<ScatterRun>> disjoint{
      {{0, 0, 1}, {2, 5, 17}, {40, 30, 33}},  // class 0
      {{20, 3, 16}, {73, 0, 64}},             // class 1
      {{140, 7, 100}, {290, 100, 10}},        // class 2
  };
  const std::vector<ScatterRun> overlapping{{30, 0, 20}};  // meets class 0's {40, 30, 33}
  for (int variant = 0; variant < 3; ++variant) {
    // 0: disjoint classes, 1: one more class overlapping, 2: a class in two dtypes.
    CAPTURE(variant);
    for (const std::size_t n : {std::size_t{7}, std::size_t{70}}) {
      CAPTURE(n);
      std::vector<ScatterData> data;
      std::vector<ScatterSource> sources;
      for (std::size_t k = 0; k < n; ++k) {
        const std::size_t cls = (k * 7 + k / 3) % 3;
        const bool odd_one = (variant == 1 && k % 5 == 4);
        const DType dt = variant == 2 && cls == 1 && k % 2 == 0 ? DType::kF32
                         : cls == 2                             ? DType::kF16
                                    : (cls == 0 ? DType::kBF16 : DType::kF32);
        data.emplace_back(rng, dt, x_rows, x_row_len, tile_rows, 4);
        sources.push_back(
            data.back().source(x_rows, x_row_len, odd_one ? overlapping : disjoint[cls],
                               0.25f * static_cast<float>(1 + k % 5), k % 3 == 1 ? 0.7f : 1.0f));
      }
      std::vector<float> ref_acc(tile_rows * row_len, 0.5f), ref_w(tile_rows * row_len, 0.25f);
      std::vector<std::uint32_t> ref_c(tile_rows * row_len, 1);
      ref_scatter(
          sources.data(), sources.size(), row_len,
          [&](std::size_t k, std::size_t e) { return data[k].value(e); }, ref_acc, ref_w, ref_c);
      edgefuse_test::for_each_simd_target([&](const std::string& target) {
        CAPTURE(target);
        for (const bool counts : {false, true}) {
          std::vector<float> acc(tile_rows * row_len, 0.5f), w(tile_rows * row_len, 0.25f);
          std::vector<std::uint32_t> c(tile_rows * row_len, 1);
          scatter_accumulate(acc.data(), w.data(), counts ? c.data() : nullptr, tile_rows, row_len,
                             sources.data(), sources.size());
          for (std::size_t i = 0; i < acc.size(); ++i) {
            REQUIRE(edgefuse_test::bits_of(acc[i]) == edgefuse_test::bits_of(ref_acc[i]));
            REQUIRE(edgefuse_test::bits_of(w[i]) == edgefuse_test::bits_of(ref_w[i]));
            REQUIRE(c[i] == (counts ? ref_c[i] : 1u));
          }
        }
      });
    }
  }
}

TEST_CASE("low-rank (LoRA) deltas join the coverage mean on their rows and columns only") {
  // The worked example's client A (delta mode), plus a rank-1 delta L·R scaled by 0.5 with
  // weight 2 covering rows {0, 2} and columns {1, 3, 5}: element (2, 1) is covered by A (4), B
  // (20) and the low-rank client (0.5 * L[2] * R[1] = 0.5 * 3 * 2 = 3, weight 2):
  // 21 + (4 + 20 + 2*3) / 4.
  Matrix m;
  const char* kRA = R"({"out": [0, 2], "in": [1, 3, 5]})";
  const char* kRB = R"({"out": [1, 2], "in": [0, 1, 2, 3]})";
  const std::vector<float> da{1, 2, 3, 4, 5, 6}, db{-1, -2, -3, -4, 10, 20, 30, 40};
  LowRankDelta d;
  d.tensor = "w";
  d.rank = 1;
  d.scale = 0.5f;
  d.l = {1, 3};     // rows 0 and 2 (compact: one row of L per covered row)
  d.r = {2, 4, 6};  // columns 1, 3 and 5
  d.rows = {0, 2};
  d.cols = {1, 3, 5};
  auto run = [&](AggregateOptions opt, std::size_t threads) {
    set_num_threads(threads);
    opt.mode = AggregateMode::kDelta;
    Aggregator agg(m.layout, opt);
    std::vector<std::vector<NamedTensor>> keep;
    for (const auto& [pj, dv] : {std::pair{kRA, &da}, std::pair{kRB, &db}}) {
      const Plan p = m.plan(pj);
      auto local = extract(views_of(m.target), m.layout, p);
      float* x = local[0].tensor.view().data_as<float>();
      for (std::size_t e = 0; e < dv->size(); ++e) x[e] = (*dv)[e];
      keep.push_back(std::move(local));
      agg.add(views_of(keep.back()), p, 1.0f, "sub");
    }
    agg.add_low_rank({d}, 2.0f, "lora");
    CHECK(agg.num_clients() == 3);
    std::vector<TensorCoverage> report;
    auto out = agg.finalize(views_of(m.target), &report);
    set_num_threads(0);
    CHECK(report[0].max_contributors == 3);
    return values_of(out[0].tensor);
  };
  // Independent recomputation in double.
  std::vector<double> want(24);
  const auto w0 = golden_w();
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 6; ++j) {
      double sum = 0, wsum = 0;
      const int ra[] = {0, 2}, ca[] = {1, 3, 5}, rb[] = {1, 2}, cb[] = {0, 1, 2, 3};
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 3; ++b) {
          if (ra[a] == i && ca[b] == j) {
            sum += da[a * 3 + b];
            wsum += 1;
          }
        }
      }
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 4; ++b) {
          if (rb[a] == i && cb[b] == j) {
            sum += db[a * 4 + b];
            wsum += 1;
          }
        }
      }
      if ((i == 0 || i == 2) && (j == 1 || j == 3 || j == 5)) {
        sum += 2.0 * 0.5 * d.l[i / 2] * d.r[j / 2];
        wsum += 2;
      }
      want[i * 6 + j] = w0[i * 6 + j] + (wsum > 0 ? sum / wsum : 0.0);
    }
  }
  const auto got = run({}, 1);
  for (int e = 0; e < 24; ++e) CHECK(got[e] == doctest::Approx(want[e]).epsilon(1e-6));
  CHECK(got[13] == 21.0f + 30.0f / 4.0f);
  CHECK(got[16] == 24.0f);  // (2, 4): nobody covers it
  for (const std::size_t tile_rows : {1, 3}) {
    for (const std::size_t threads : {1, 2, 3}) {
      AggregateOptions opt;
      opt.tile_rows = tile_rows;
      CHECK(run(opt, threads) == got);
    }
  }
  // Bad low-rank updates name the client and the rule.
  Aggregator params(m.layout);
  CHECK_THROWS_WITH(params.add_low_rank({d}, 1.0f, "c9"),
                    "c9: low-rank (LoRA) updates are deltas; the aggregation mode must be delta");
  AggregateOptions dopt;
  dopt.mode = AggregateMode::kDelta;
  Aggregator agg(m.layout, dopt);
  LowRankDelta bad = d;
  bad.r[2] = NAN;
  CHECK_THROWS_WITH(
      agg.add_low_rank({bad}, 1.0f, "c9"),
      "c9: tensor 'w': a factor holds a non-finite value at element 2 (client rejected)");
  bad = d;
  bad.l = {1, 0, 3, 0};  // full-height L with a row list
  CHECK_THROWS_WITH(agg.add_low_rank({bad}, 1.0f, "c9"),
                    "c9: tensor 'w': factors of 4 and 3 values do not make a rank-1 update of 2 of "
                    "its 4 rows and 3 of its 6 columns (client rejected)");
  bad = d;
  bad.cols = {3, 1};
  CHECK_THROWS_WITH(
      agg.add_low_rank({bad}, 1.0f, "c9"),
      "c9: tensor 'w': covered columns must be sorted, distinct and < 6 (client rejected)");
  bad = d;
  bad.tensor = "v";
  CHECK_THROWS_WITH(agg.add_low_rank({bad}, 1.0f, "c9"),
                    "c9: tensor 'v' is not in the target (client rejected)");
  CHECK(agg.num_clients() == 0);
}

TEST_CASE(
    "a lone low-rank delta on a few columns is summed only there, with the same bits and "
    "coverage") {
  // Columns {1, 3, 5} are three segments covering half of each 6-wide row: the tile sums and
  // finalises only them and copies the rest. Rows {0, 2} get W + 0.5 * L[i] * R[j] (weight 2
  // cancels in the mean); every other element keeps its bits.
  Matrix m;
  LowRankDelta d;
  d.tensor = "w";
  d.rank = 1;
  d.scale = 0.5f;
  d.l = {1, 3};
  d.r = {2, 4, 6};
  d.rows = {0, 2};
  d.cols = {1, 3, 5};
  const auto w0 = golden_w();
  std::vector<float> want(w0.begin(), w0.end());
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 3; ++b) {
      want[static_cast<std::size_t>(d.rows[a] * 6 + d.cols[b])] += 0.5f * d.l[a] * d.r[b];
    }
  }
  for (const bool counts : {true, false}) {
    for (const std::size_t tile_rows : {0, 1, 3}) {
      for (const std::size_t threads : {1, 2}) {
        set_num_threads(threads);
        AggregateOptions opt;
        opt.mode = AggregateMode::kDelta;
        opt.coverage_counts = counts;
        opt.tile_rows = tile_rows;
        Aggregator agg(m.layout, opt);
        agg.add_low_rank({d}, 2.0f, "lora");
        std::vector<TensorCoverage> report;
        auto out = agg.finalize(views_of(m.target), &report);
        set_num_threads(0);
        CHECK(values_of(out[0].tensor) == want);
        CHECK(report[0].covered == 6);
        CHECK(report[0].min_contributors == 0);
        CHECK(report[0].max_contributors == 1);
      }
    }
  }
}

TEST_CASE("a server optimizer steps on the fused mean delta where clients cover, state and all") {
  // Clients A (rows {0, 2} x columns {1, 3, 5}, weight 1) and B (rows {1, 2} x columns
  // {0..3}, weight 3) send deltas. Per element the aggregator's sums are, in client order,
  // acc = (-0 + 1*a) + 3*b and wsum = (0 + 1) + 3 over the clients covering it; FedAdam's step
  // on acc/wsum is then the kernel's, bit for bit. Element (3, 4) is covered by neither: it
  // keeps W and its state.
  Matrix m;
  const char* kRA = R"({"out": [0, 2], "in": [1, 3, 5]})";
  const char* kRB = R"({"out": [1, 2], "in": [0, 1, 2, 3]})";
  const std::vector<float> da{0.5f, -1, 2, 0.25f, 4, -3}, db{1, 2, -2, 0.5f, 3, -1, 1, 6};
  const float wa = 1.0f, wb = 3.0f;
  std::vector<float> acc(24, -0.0f), wsum(24, 0.0f);
  auto add = [&](const std::vector<int>& rows, const std::vector<int>& cols,
                 const std::vector<float>& d, float w) {
    for (std::size_t a = 0; a < rows.size(); ++a) {
      for (std::size_t b = 0; b < cols.size(); ++b) {
        const std::size_t e = static_cast<std::size_t>(rows[a] * 6 + cols[b]);
        acc[e] = acc[e] + w * d[a * cols.size() + b];
        wsum[e] = wsum[e] + w;
      }
    }
  };
  add({0, 2}, {1, 3, 5}, da, wa);
  add({1, 2}, {0, 1, 2, 3}, db, wb);
  ServerStep step;  // FedAdam, b1 0.9, b2 0.99, tau 1e-3
  step.lr = 0.5f;
  std::vector<float> m0(24), v0(24);
  for (std::size_t e = 0; e < 24; ++e) {
    m0[e] = 0.01f * static_cast<float>(e);
    v0[e] = 0.001f * static_cast<float>(e + 1);
  }
  // Two rounds of the kernel on the same sums: what two aggregator rounds must give.
  auto w0 = golden_w();
  std::vector<float> want(w0.begin(), w0.end()), want_m = m0, want_v = v0;
  for (int round = 0; round < 2; ++round) {
    server_step(want.data(), want.data(), acc.data(), wsum.data(), want_m.data(), want_v.data(), 24,
                step);
  }
  for (const std::size_t tile_rows : {0, 1, 3}) {
    for (const std::size_t threads : {1, 2}) {
      CAPTURE(tile_rows);
      CAPTURE(threads);
      set_num_threads(threads);
      AggregateOptions opt;
      opt.mode = AggregateMode::kDelta;
      opt.server = step;
      opt.tile_rows = tile_rows;
      std::vector<float> ms = m0, vs = v0, w(w0.begin(), w0.end());
      for (int round = 0; round < 2; ++round) {
        Aggregator agg(m.layout, opt);
        std::vector<std::vector<NamedTensor>> keep;
        const std::tuple<const char*, const std::vector<float>*, float> clients[] = {
            {kRA, &da, wa}, {kRB, &db, wb}};
        for (const auto& [pj, dv, wt] : clients) {
          const Plan p = m.plan(pj);
          auto local = extract(views_of(m.target), m.layout, p);
          float* x = local[0].tensor.view().data_as<float>();
          for (std::size_t e = 0; e < dv->size(); ++e) x[e] = (*dv)[e];
          keep.push_back(std::move(local));
          agg.add(views_of(keep.back()), p, wt, "c");
        }
        ServerState state;
        state.m = {TensorView(ms.data(), DType::kF32, Shape{4, 6})};
        state.v = {TensorView(vs.data(), DType::kF32, Shape{4, 6})};
        const TensorView out(w.data(), DType::kF32, Shape{4, 6});
        const NamedViews base{{"w", ConstTensorView(w.data(), DType::kF32, Shape{4, 6})}};
        const auto report = agg.finalize(base, {out}, state);
        CHECK(report[0].covered == 12);
      }
      set_num_threads(0);
      CHECK(w == want);
      CHECK(ms == want_m);
      CHECK(vs == want_v);
      CHECK(w[22] == 34.0f);  // (3, 4): uncovered
      CHECK(ms[22] == m0[22]);
      CHECK(vs[22] == v0[22]);
    }
  }
  // Misuse is named.
  AggregateOptions bad;
  bad.mode = AggregateMode::kDelta;
  bad.server = step;
  bad.finite_check = FiniteCheck::kWhileFusing;
  CHECK_THROWS_WITH_AS(Aggregator(m.layout, bad),
                       "aggregate: a server optimizer needs FiniteCheck::kOnAdd (its state is "
                       "updated in place, so a round cannot be computed again without a client)",
                       Error);
  bad.finite_check = FiniteCheck::kOnAdd;
  bad.server->beta2 = 1.0f;
  CHECK_THROWS_WITH_AS(Aggregator(m.layout, bad), "server_step: beta2 = 1 must be in [0, 1)",
                       Error);
  bad.server = step;
  Aggregator agg(m.layout, bad);
  const Plan p = m.plan(kRA);
  auto local = extract(views_of(m.target), m.layout, p);
  agg.add(views_of(local), p, 1.0f, "c");
  std::vector<float> w(w0.begin(), w0.end());
  const NamedViews base{{"w", ConstTensorView(w.data(), DType::kF32, Shape{4, 6})}};
  const TensorView out(w.data(), DType::kF32, Shape{4, 6});
  CHECK_THROWS_WITH_AS(agg.finalize(base, {out}),
                       "aggregate: a server optimizer's state goes through finalize(target, out, "
                       "state)",
                       Error);
  // A step that leaves the output's range is an error naming the element. The client sends
  // the target's own values as its delta, so with FedAvgM (momentum 0.5, lr 3e38) element
  // (0, 1) moves by 3e38 * (0.5 * 0.01 + 1), still finite, and (0, 3) by 3e38 * 3.015: +Inf.
  {
    AggregateOptions huge = bad;
    huge.server->rule = ServerRule::kFedAvgM;
    huge.server->momentum = 0.5f;
    huge.server->lr = 3e38f;
    Aggregator a2(m.layout, huge);
    a2.add(views_of(local), p, 1.0f, "c");
    std::vector<float> ms = m0;
    ServerState state;
    state.m = {TensorView(ms.data(), DType::kF32, Shape{4, 6})};
    CHECK_THROWS_WITH_AS(a2.finalize(base, {out}, state),
                         "aggregate: tensor 'w' element [0, 3]: the server optimizer's step gives "
                         "inf, which is not finite in F32",
                         Error);
  }
  std::vector<float> small(6);
  ServerState wrong;
  wrong.m = {TensorView(small.data(), DType::kF32, Shape{1, 6})};
  wrong.v = {TensorView(small.data(), DType::kF32, Shape{1, 6})};
  CHECK_THROWS_WITH_AS(agg.finalize(base, {out}, wrong),
                       "aggregate: server state m of tensor 'w' is F32 [1, 6]; expected F32 [4, 6]",
                       Error);
}

TEST_CASE(
    "low-rank sources made per tensor fuse bit for bit like held deltas, holding one tensor") {
  // Two weights, three low-rank clients with row and column lists of several runs, ranks 1-3.
  std::vector<NamedTensor> target;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto random_tensor = [&](const char* name, std::uint64_t r, std::uint64_t c) {
    std::vector<float> v(r * c);
    for (auto& x : v) x = u(gen);
    return f32_tensor(name, {r, c}, v);
  };
  target.push_back(random_tensor("a", 37, 41));
  target.push_back(random_tensor("b", 20, 9));
  const ModelLayout layout =
      Schema::from_json(R"({"axes": {}, "tensors": {"a": [null, null], "b": [null, null]}})",
                        "two.json")
          .bind(edgefuse_test::metas_of(target));
  auto delta = [&](const std::string& name, std::size_t rank, std::vector<std::uint32_t> rows,
                   std::vector<std::uint32_t> cols) {
    const auto& shape = layout.find(name)->meta.shape;
    LowRankDelta d;
    d.tensor = name;
    d.rank = rank;
    d.scale = 0.75f;
    d.rows = std::move(rows);
    d.cols = std::move(cols);
    d.l.resize((d.rows.empty() ? shape[0] : d.rows.size()) * rank);
    d.r.resize(rank * (d.cols.empty() ? shape[1] : d.cols.size()));
    for (auto& x : d.l) x = u(gen);
    for (auto& x : d.r) x = u(gen);
    return d;
  };
  const std::vector<std::vector<LowRankDelta>> clients{
      {delta("a", 3, {0, 1, 2, 9, 10, 30, 36}, {4, 5, 6, 7, 20, 40}), delta("b", 2, {}, {})},
      {delta("a", 1, {}, {0, 1, 2, 3, 38, 39, 40})},
      {delta("b", 2, {3, 4, 5, 6, 19}, {}), delta("a", 2, {2, 3, 36}, {})}};
  const std::vector<float> weights{1.0f, 2.5f, 0.5f};

  // Reference in double: per element, the weighted mean of the covering clients' deltas.
  std::vector<std::vector<double>> want;
  for (const auto& t : target) {
    const std::uint64_t rows = t.tensor.shape()[0], cols = t.tensor.shape()[1];
    std::vector<double> sum(rows * cols, 0.0), wsum(rows * cols, 0.0);
    for (std::size_t c = 0; c < clients.size(); ++c) {
      for (const auto& d : clients[c]) {
        if (d.tensor != t.name) continue;
        const std::size_t nr = d.rows.empty() ? rows : d.rows.size();
        const std::size_t nc = d.cols.empty() ? cols : d.cols.size();
        for (std::size_t i = 0; i < nr; ++i) {
          for (std::size_t j = 0; j < nc; ++j) {
            double dot = 0;
            for (std::size_t k = 0; k < d.rank; ++k)
              dot += double(d.l[i * d.rank + k]) * d.r[k * nc + j];
            const std::size_t e =
                (d.rows.empty() ? i : d.rows[i]) * cols + (d.cols.empty() ? j : d.cols[j]);
            sum[e] += weights[c] * d.scale * dot;
            wsum[e] += weights[c];
          }
        }
      }
    }
    const float* w0 = t.tensor.view().data_as<float>();
    std::vector<double> w(rows * cols);
    for (std::size_t e = 0; e < w.size(); ++e)
      w[e] = w0[e] + (wsum[e] > 0 ? sum[e] / wsum[e] : 0.0);
    want.push_back(std::move(w));
  }

  std::map<std::string, int> calls;  // "client/tensor" -> times made
  auto run = [&](bool lazy, AggregateOptions opt, std::size_t threads, std::uint64_t* resident) {
    set_num_threads(threads);
    opt.mode = AggregateMode::kDelta;
    Aggregator agg(layout, opt);
    for (std::size_t c = 0; c < clients.size(); ++c) {
      const std::string label = "client" + std::to_string(c);
      if (!lazy) {
        agg.add_low_rank(clients[c], weights[c], label);
        continue;
      }
      std::vector<std::string> names;
      for (const auto& d : clients[c]) names.push_back(d.tensor);
      agg.add_low_rank(names, weights[c], label, [&, c, label](const std::string& name) {
        ++calls[label + "/" + name];
        for (const auto& d : clients[c]) {
          if (d.tensor == name) return d;
        }
        return LowRankDelta{};
      });
    }
    if (resident) *resident = agg.resident_bytes();
    auto out = agg.finalize(views_of(target));
    set_num_threads(0);
    return std::vector<std::vector<float>>{values_of(out[0].tensor), values_of(out[1].tensor)};
  };
  std::uint64_t held_bytes = 0, lazy_bytes = 0;
  const auto got = run(false, {}, 1, &held_bytes);
  for (std::size_t t = 0; t < 2; ++t) {
    for (std::size_t e = 0; e < want[t].size(); ++e) {
      REQUIRE(got[t][e] == doctest::Approx(want[t][e]).epsilon(1e-5));
    }
  }
  // An element no client covers keeps its bits: a(4, 10) (row 4 is not in the row lists of
  // clients 0 and 2, column 10 not in client 1's column list).
  CHECK(got[0][4 * 41 + 10] == target[0].tensor.view().data_as<float>()[4 * 41 + 10]);
  calls.clear();
  CHECK(run(true, {}, 1, &lazy_bytes) == got);
  // Made once per tensor at registration and once when it is computed.
  CHECK(calls == std::map<std::string, int>{{"client0/a", 2},
                                            {"client0/b", 2},
                                            {"client1/a", 2},
                                            {"client2/a", 2},
                                            {"client2/b", 2}});
  // Held: every factor of every client; made on demand: only the largest tensor's.
  CHECK(lazy_bytes < held_bytes);
  CHECK(held_bytes >
        4 * (7 * 3 + 3 * 6 + 20 * 2 + 2 * 9 + 37 + 7 + 5 * 2 + 9 * 2 + 3 * 2 + 41 * 2));
  for (const std::size_t tile_rows : {1, 2, 5}) {
    for (const std::size_t threads : {1, 2, 3}) {
      AggregateOptions opt;
      opt.tile_rows = tile_rows;
      CHECK(run(true, opt, threads, nullptr) == got);
      CHECK(run(false, opt, threads, nullptr) == got);
    }
  }
  // Rows computed in pieces (as the checkpoint writer asks for them) make each delta once.
  {
    AggregateOptions opt;
    opt.mode = AggregateMode::kDelta;
    Aggregator agg(layout, opt);
    int made = 0;
    agg.add_low_rank(std::vector<std::string>{"a"}, 1.0f, "c", [&](const std::string&) {
      ++made;
      return clients[0][0];
    });
    std::vector<float> rows(37 * 41);
    const std::byte* base = target[0].tensor.view().bytes();
    for (std::uint64_t r0 = 0; r0 < 37; r0 += 5) {
      const std::uint64_t r1 = std::min<std::uint64_t>(37, r0 + 5);
      agg.compute_rows(0, base + r0 * 41 * 4, r0, r1,
                       reinterpret_cast<std::byte*>(rows.data() + r0 * 41));
    }
    CHECK(made == 2);
  }
  // A source that fails at registration leaves the aggregator unchanged; one that gives a
  // different tensor or a bad delta later fails finalize naming the client.
  AggregateOptions dopt;
  dopt.mode = AggregateMode::kDelta;
  Aggregator agg(layout, dopt);
  CHECK_THROWS_WITH(agg.add_low_rank(std::vector<std::string>{"a"}, 1.0f, "c7",
                                     [&](const std::string&) -> LowRankDelta {
                                       throw Error("c7: tensor 'a': bad file");
                                     }),
                    "c7: tensor 'a': bad file");
  CHECK_THROWS_WITH(agg.add_low_rank(std::vector<std::string>{"a", "a"}, 1.0f, "c7",
                                     [&](const std::string&) { return clients[0][0]; }),
                    "c7: tensor 'a' given twice (client rejected)");
  CHECK_THROWS_WITH(agg.add_low_rank(std::vector<std::string>{"b"}, 1.0f, "c7",
                                     [&](const std::string&) { return clients[0][0]; }),
                    "c7: asked for tensor 'b' the source made 'a'");
  CHECK(agg.num_clients() == 0);
  int n = 0;
  agg.add_low_rank(std::vector<std::string>{"a"}, 1.0f, "c8", [&](const std::string&) {
    LowRankDelta d = clients[0][0];
    if (n++ > 0) d.l[5] = INFINITY;
    return d;
  });
  CHECK_THROWS_WITH(
      agg.finalize(views_of(target)),
      "c8: tensor 'a': a factor holds a non-finite value at element 5 (client rejected)");
}

namespace {
// Each client holds 1/8 of the columns (rolling windows, one wrapping around) and a block of
// rows, so most tiles are zeroed and finalised only on a few segments and copied elsewhere.
// C = 80 scatters source by source, C = 160 row by row (rows of 128+ elements).
void check_width_sliced(const std::uint64_t C) {
  CAPTURE(C);
  const std::uint64_t R = 24;
  std::vector<float> w0(R * C);
  for (std::size_t i = 0; i < w0.size(); ++i) w0[i] = 0.25f * static_cast<float>(i % 17) - 2.0f;
  std::vector<NamedTensor> target;
  {
    Tensor t = Tensor::empty(DType::kBF16, Shape{R, C});
    auto* p = t.view().data_as<BFloat16>();
    for (std::size_t i = 0; i < w0.size(); ++i) p[i] = to_bf16(w0[i]);
    target.push_back({"w", std::move(t)});
  }
  const ModelLayout layout =
      Schema::from_json(R"({"axes": {"out": {"size": 24}, "in": {"size": )" + std::to_string(C) +
                            R"(}}, "tensors": {"w": ["out", "in"]}})",
                        "w.json")
          .bind(edgefuse_test::metas_of(target));
  auto window = [](std::uint64_t n, std::uint64_t start, std::uint64_t len) {
    std::vector<std::uint32_t> v;
    for (std::uint64_t j = 0; j < len; ++j)
      v.push_back(static_cast<std::uint32_t>((start + j) % n));
    return v;
  };
  std::vector<Plan> plans;
  plans.push_back({{{"out", window(R, 0, 8)}, {"in", window(C, 0, 10)}}, {}});
  plans.push_back({{{"out", window(R, 4, 8)}, {"in", window(C, 10, 10)}}, {}});
  plans.push_back({{{"out", window(R, 20, 8)}, {"in", window(C, C - 5, 10)}}, {}});  // both wrap
  plans.push_back({{{"out", window(R, 8, 12)}, {"in", window(C, 5, 10)}}, {}});
  std::vector<std::uint32_t> two = window(C, 30, 5);
  for (auto j : window(C, 60, 5)) two.push_back(j);
  plans.push_back({{{"out", window(R, 0, 24)}, {"in", two}}, {}});
  std::vector<std::vector<NamedTensor>> ups;
  for (std::size_t c = 0; c < plans.size(); ++c) {
    auto local = extract(views_of(target), layout, plans[c], DType::kF32);
    float* x = local[0].tensor.view().data_as<float>();
    for (std::size_t e = 0; e < local[0].tensor.numel(); ++e) {
      x[e] = 0.01f * static_cast<float>((e * 13 + c * 7) % 29) - 0.1f;
    }
    ups.push_back(std::move(local));
  }
  auto run = [&](std::size_t tile_rows, std::size_t threads, std::vector<TensorCoverage>* rep) {
    set_num_threads(threads);
    AggregateOptions opt;
    opt.mode = AggregateMode::kDelta;
    opt.server_lr = 0.75f;
    opt.tile_rows = tile_rows;
    Aggregator agg(layout, opt);
    for (std::size_t c = 0; c < plans.size(); ++c)
      agg.add(views_of(ups[c]), plans[c], 0.5f + c, "c");
    auto out = agg.finalize(views_of(target), rep);
    set_num_threads(0);
    std::vector<std::uint16_t> bits(R * C);
    for (std::size_t i = 0; i < bits.size(); ++i)
      bits[i] = out[0].tensor.view().data_as<BFloat16>()[i].bits;
    return bits;
  };
  // The scalar reference: f32 sums in client order, then base + lr * acc / wsum rounded once.
  std::vector<float> acc(R * C, 0.0f), wsum(R * C, 0.0f);
  std::vector<std::uint32_t> cnt(R * C, 0);
  for (std::size_t c = 0; c < plans.size(); ++c) {
    const auto& rows = plans[c].axes.at("out");
    const auto& cols = plans[c].axes.at("in");
    const float* x = ups[c][0].tensor.view().data_as<float>();
    for (std::size_t i = 0; i < rows.size(); ++i) {
      for (std::size_t j = 0; j < cols.size(); ++j) {
        const std::size_t e = rows[i] * C + cols[j];
        acc[e] += (0.5f + c) * x[i * cols.size() + j];
        wsum[e] += 0.5f + c;
        ++cnt[e];
      }
    }
  }
  std::vector<TensorCoverage> rep;
  const auto got = run(0, 1, &rep);
  std::uint64_t covered = 0;
  std::uint32_t mx = 0;
  for (std::size_t e = 0; e < R * C; ++e) {
    const BFloat16 b = to_bf16(w0[e]);
    std::uint16_t want = b.bits;
    if (wsum[e] > 0) {
      volatile float q = acc[e] / wsum[e];
      volatile float inc = 0.75f * q;
      if (inc != 0.0f) want = edgefuse_test::ref_to_bf16(to_f32(b) + inc);
    }
    CAPTURE(e);
    REQUIRE(got[e] == want);
    covered += cnt[e] > 0;
    mx = std::max(mx, cnt[e]);
  }
  CHECK(rep[0].covered == covered);
  CHECK(rep[0].max_contributors == mx);
  CHECK(rep[0].min_contributors == 0);
  for (const std::size_t tile_rows : {1, 3, 8, 24}) {
    for (const std::size_t threads : {1, 2, 3}) {
      std::vector<TensorCoverage> r2;
      CHECK(run(tile_rows, threads, &r2) == got);
      CHECK(r2[0].covered == covered);
      CHECK(r2[0].max_contributors == mx);
    }
  }
}
}  // namespace

TEST_CASE("width-sliced clients (a few column segments per tile) equal a scalar recomputation") {
  check_width_sliced(80);
  check_width_sliced(160);
}

TEST_CASE(
    "shares kept per {layer} rule: layers of different widths, clients added after finalize") {
  // blocks.{layer}.w binds rows to h and leaves columns unbound, so layer 1 may be wider
  // than layers 0 and 2: its shares cannot be those built for layer 0 and are built on
  // their own. Target values 100 t + 10 r + c; a client sends target + delta.
  std::vector<NamedTensor> target;
  const std::uint64_t cols[3] = {3, 5, 3};
  for (int t = 0; t < 3; ++t) {
    std::vector<float> v;
    for (std::uint64_t r = 0; r < 4; ++r) {
      for (std::uint64_t c = 0; c < cols[t]; ++c)
        v.push_back(static_cast<float>(100 * t + 10 * r + c));
    }
    target.push_back(f32_tensor("blocks." + std::to_string(t) + ".w", {4, cols[t]}, v));
  }
  const ModelLayout layout =
      Schema::from_json(
          R"({"axes": {"h": {"size": 4}}, "tensors": {"blocks.{layer}.w": ["h", null]}})",
          "layers.json")
          .bind(edgefuse_test::metas_of(target));
  struct C {
    const char* plan;
    float delta, weight;
  };
  const C cs[3] = {{R"({"h": [2, 0], "layers": [0, 1]})", 4, 1},
                   {R"({"h": [0, 3], "layers": [1, 2]})", 8, 3},
                   {R"({"h": [1], "layers": [2, 0, 1]})", -2, 2}};
  std::vector<std::vector<NamedTensor>> ups;
  for (const C& c : cs) {
    const float d = c.delta;
    ups.push_back(
        client_of(target, layout, parse_plan(c.plan, layout, "p"), [d](std::size_t) { return d; }));
  }
  // Expected: each row's mean delta over the clients holding that row of that layer.
  auto expected = [&](std::size_t n) {
    std::vector<std::vector<float>> want;
    for (std::size_t t = 0; t < 3; ++t) {
      std::vector<float> v = values_of(target[t].tensor);
      for (std::uint32_t r = 0; r < 4; ++r) {
        float sum = 0, wsum = 0;
        for (std::size_t k = 0; k < n; ++k) {
          const Plan p = parse_plan(cs[k].plan, layout, "p");
          const auto& h = p.axes.at("h");
          const auto& l = p.axes.at("layers");
          if (std::find(h.begin(), h.end(), r) == h.end() ||
              std::find(l.begin(), l.end(), t) == l.end())
            continue;
          sum += cs[k].weight * cs[k].delta;
          wsum += cs[k].weight;
        }
        if (wsum == 0) continue;
        for (std::uint64_t c = 0; c < cols[t]; ++c) v[r * cols[t] + c] += sum / wsum;
      }
      want.push_back(std::move(v));
    }
    return want;
  };
  auto values = [](const std::vector<NamedTensor>& out) {
    std::vector<std::vector<float>> v;
    for (const auto& t : out) v.push_back(values_of(t.tensor));
    return v;
  };
  // Layer 0's and layer 2's row means differ, and layer 1 has 5 columns.
  const auto want2 = expected(2), want3 = expected(3);
  CHECK(want2[0] == std::vector<float>{4, 5, 6, 10, 11, 12, 24, 25, 26, 30, 31, 32});
  CHECK(want2[1][4] == 104 + 7);  // row 0 of layer 1: clients 0 and 1, (4 + 3 * 8) / 4
  CHECK(want2[2][0] == 200 + 8);
  for (std::size_t threads : {1, 2}) {
    set_num_threads(threads);
    Aggregator agg(layout, {});
    agg.add(views_of(ups[0]), parse_plan(cs[0].plan, layout, "p"), cs[0].weight, "c0");
    agg.add(views_of(ups[1]), parse_plan(cs[1].plan, layout, "p"), cs[1].weight, "c1");
    // compute_rows, tensors in reverse order and rows one at a time (the shares stay kept
    // between calls), then finalize.
    auto by_rows = [&](const std::vector<std::vector<float>>& want) {
      for (std::size_t t = 3; t-- > 0;) {
        std::vector<float> out(4 * cols[t]);
        for (std::uint64_t r = 0; r < 4; ++r) {
          agg.compute_rows(t, target[t].tensor.view().bytes() + r * cols[t] * 4, r, r + 1,
                           reinterpret_cast<std::byte*>(out.data() + r * cols[t]));
        }
        CHECK(out == want[t]);
      }
    };
    by_rows(want2);
    CHECK(values(agg.finalize(views_of(target))) == want2);
    by_rows(want2);
    // A client added while shares are kept joins every later computation.
    agg.add(views_of(ups[2]), parse_plan(cs[2].plan, layout, "p"), cs[2].weight, "c2");
    by_rows(want3);
    CHECK(values(agg.finalize(views_of(target))) == want3);
  }
  set_num_threads(0);
}

namespace {

// add()'s message for a client in FiniteCheck::kOnAdd (empty when it is accepted).
std::string on_add_message(const Llama& m, const std::vector<NamedTensor>& up, std::size_t c) {
  Aggregator agg(*m.layout);
  try {
    agg.add(views_of(up), parse_plan(kLlamaPlans[c], *m.layout, "p"), 0.5f + c,
            "c" + std::to_string(c));
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

// Client c's update with one value NaN (bf16) or +Inf (f32) at element e of tensor i.
void poison(std::vector<NamedTensor>& up, std::size_t i, std::size_t e) {
  Tensor& t = up[i].tensor;
  if (t.dtype() == DType::kBF16) {
    t.view().data_as<BFloat16>()[e].bits = 0x7FC0;
  } else {
    t.view().data_as<float>()[e] = std::numeric_limits<float>::infinity();
  }
}

// Aggregates the clients `which` of `ups` (weights 0.5 + c, labels "c<c>").
Aggregator llama_aggregator(const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
                            const std::vector<std::size_t>& which, AggregateOptions opt) {
  Aggregator agg(*m.layout, opt);
  for (std::size_t c : which) {
    agg.add(views_of(ups[c]), parse_plan(kLlamaPlans[c], *m.layout, "p"), 0.5f + c,
            "c" + std::to_string(c));
  }
  return agg;
}

bool same_report(const std::vector<TensorCoverage>& a, const std::vector<TensorCoverage>& b) {
  bool same = a.size() == b.size();
  for (std::size_t i = 0; same && i < a.size(); ++i) {
    same = a[i].covered == b[i].covered && a[i].min_contributors == b[i].min_contributors &&
           a[i].max_contributors == b[i].max_contributors;
  }
  return same;
}

}  // namespace

TEST_CASE(
    "FiniteCheck::kWhileFusing drops bad clients in finalize with add()'s message and fuses the "
    "rest bit for bit") {
  for (auto mode : {AggregateMode::kParams, AggregateMode::kDelta}) {
    CAPTURE(static_cast<int>(mode));
    Llama m;
    auto ups = llama_updates(m, mode);
    AggregateOptions on_add;
    on_add.mode = mode;
    on_add.server_lr = 0.75f;
    AggregateOptions fused = on_add;
    fused.finite_check = FiniteCheck::kWhileFusing;
    // Sound clients: the same bits and report as checking on add, nothing rejected.
    std::vector<TensorCoverage> want_report, rep;
    const auto all = llama_aggregator(m, ups, {0, 1, 2, 3, 4}, on_add)
                         .finalize(views_of(m.target), &want_report);
    {
      Aggregator agg = llama_aggregator(m, ups, {0, 1, 2, 3, 4}, fused);
      CHECK(same_bytes(agg.finalize(views_of(m.target), &rep), all));
      CHECK(same_report(rep, want_report));
      CHECK(agg.rejected().empty());
    }
    // Client 1 (bf16) gets a NaN in its fourth tensor, client 3 (f32) an Inf as its last value.
    poison(ups[1], 3, 5);
    poison(ups[3], ups[3].size() - 1, static_cast<std::size_t>(ups[3].back().tensor.numel() - 1));
    const std::string msg1 = on_add_message(m, ups[1], 1), msg3 = on_add_message(m, ups[3], 3);
    CHECK(msg1 == "c1: tensor '" + ups[1][3].name +
                      "' holds a non-finite value at element 5 (client rejected)");
    CHECK(doctest::String(msg3.c_str()) ==
          doctest::Contains("c3: tensor 'lm_head.weight' holds a non-finite value"));
    const auto want =
        llama_aggregator(m, ups, {0, 2, 4}, on_add).finalize(views_of(m.target), &want_report);
    REQUIRE_FALSE(same_bytes(want, all));
    for (std::size_t threads : {1, 2, 3}) {
      for (std::size_t rows : {0, 3}) {
        CAPTURE(threads);
        CAPTURE(rows);
        set_num_threads(threads);
        fused.tile_rows = rows;
        Aggregator agg = llama_aggregator(m, ups, {0, 1, 2, 3, 4}, fused);  // add() accepts them
        CHECK(agg.num_clients() == 5);
        CHECK(same_bytes(agg.finalize(views_of(m.target), &rep), want));
        CHECK(same_report(rep, want_report));
        CHECK(agg.rejected() == std::vector<std::string>{msg1, msg3});
        CHECK(agg.num_clients() == 3);
        CHECK(same_bytes(agg.finalize(views_of(m.target)), want));  // again: nothing left to drop
        CHECK(agg.rejected().size() == 2);
      }
    }
    set_num_threads(0);
    fused.tile_rows = 0;
    // In place: the clients are scanned before the target is written.
    {
      Llama t;
      Aggregator agg = llama_aggregator(t, ups, {0, 1, 2, 3, 4}, fused);
      std::vector<TensorView> out;
      for (auto& x : t.target) out.push_back(x.tensor.view());
      agg.finalize(views_of(t.target), out);
      CHECK(same_bytes(t.target, want));
      CHECK(agg.rejected() == std::vector<std::string>{msg1, msg3});
    }
    // compute_rows: scanned before the first rows are given out.
    {
      Aggregator agg = llama_aggregator(m, ups, {0, 1, 2, 3, 4}, fused);
      bool same = true;
      for (std::size_t ti = 0; ti < m.layout->tensors().size(); ++ti) {
        const auto& meta = m.layout->tensors()[ti].meta;
        const std::uint64_t rows = meta.shape.rank() >= 2 ? meta.shape[0] : 1;
        std::vector<std::byte> out(m.target[ti].tensor.nbytes());
        agg.compute_rows(ti, m.target[ti].tensor.view().bytes(), 0, rows, out.data());
        same = same && std::memcmp(out.data(), want[ti].tensor.view().bytes(), out.size()) == 0;
      }
      CHECK(same);
      CHECK(agg.rejected() == std::vector<std::string>{msg1, msg3});
    }
    // Every client bad: the error says why none is left.
    Aggregator bad = llama_aggregator(m, ups, {1}, fused);
    CHECK_THROWS_WITH_AS(bad.finalize(views_of(m.target)),
                         ("aggregate: no client update was added (after dropping 1 client(s) for "
                          "non-finite values; the first: " +
                          msg1 + ")")
                             .c_str(),
                         Error);
    ups = llama_updates(m, mode);
  }
}

TEST_CASE("FiniteCheck::kWhileFusing still scans in add() what finalize never reads") {
  Llama m;
  auto ups = llama_updates(m, AggregateMode::kParams);
  AggregateOptions fused;
  fused.finite_check = FiniteCheck::kWhileFusing;
  // Weight 0: the client's values are never added.
  poison(ups[0], 0, 1);
  Aggregator agg(*m.layout, fused);
  CHECK_THROWS_WITH_AS(
      agg.add(views_of(ups[0]), parse_plan(kLlamaPlans[0], *m.layout, "p"), 0.0f, "zero"),
      ("zero: tensor '" + ups[0][0].name +
       "' holds a non-finite value at element 1 (client rejected)")
          .c_str(),
      Error);
  // "aggregate_only" (plan 2 keeps vocabulary rows 0, 5, 7 and 39 of its window): a NaN in a
  // row it does not aggregate is still a bad update.
  const Plan p2 = parse_plan(kLlamaPlans[2], *m.layout, "p");
  const auto cts = client_tensors(*m.layout, p2);
  REQUIRE(cts[0].name == "model.embed_tokens.weight");
  const auto row_len = static_cast<std::size_t>(cts[0].shape[1]);
  poison(ups[2], 0, 1 * row_len + 2);  // local row 1: vocabulary row 1, not aggregated
  CHECK_THROWS_WITH_AS(
      agg.add(views_of(ups[2]), p2, 1.0f, "masked"),
      ("masked: tensor 'model.embed_tokens.weight' holds a non-finite value at element " +
       std::to_string(row_len + 2) + " (client rejected)")
          .c_str(),
      Error);
  CHECK(agg.num_clients() == 0);
  // Finite values whose weighted sum overflows f32: no client is to blame, nothing is
  // rejected, and both checks give the finite mean (the overflowing tile is summed again with
  // scaled weights).
  std::vector<NamedTensor> target;
  target.push_back(f32_tensor("w", {4, 6}, golden_w()));
  const ModelLayout layout = Schema::from_json(edgefuse_test::kMatrixSchema, "matrix.json")
                                 .bind(edgefuse_test::metas_of(target));
  Plan whole;
  auto big = extract(views_of(target), layout, whole);
  for (std::size_t i = 0; i < 24; ++i) big[0].tensor.view().data_as<float>()[i] = 3e38f;
  std::vector<float> got[2];
  for (int k = 0; k < 2; ++k) {
    AggregateOptions o;
    o.finite_check = k ? FiniteCheck::kWhileFusing : FiniteCheck::kOnAdd;
    Aggregator a(layout, o);
    a.add(views_of(big), whole, 1.0f, "a");
    a.add(views_of(big), whole, 1.0f, "b");
    got[k] = values_of(a.finalize(views_of(target))[0].tensor);
    CHECK(a.rejected().empty());
    CHECK(a.num_clients() == 2);
  }
  for (std::size_t i = 0; i < 24; ++i) {
    CHECK(got[0][i] == 3e38f);
    CHECK(edgefuse_test::same_float(got[0][i], got[1][i]));
  }
}
