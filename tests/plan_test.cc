// Schemas, presets and plans (plan/schema.h, plan/plan.h): binding, bad input, JSON forms.
#include "edgefuse/plan/plan.h"

#include <doctest/doctest.h>

#include "edgefuse/core/error.h"
#include "edgefuse/plan/schema.h"
#include "extract_helpers.h"

using namespace edgefuse;

namespace {

std::vector<TensorMeta> gpt2_metas(bool prefix, int layers) {
  const std::string p = prefix ? "transformer." : "";
  std::vector<TensorMeta> m{{p + "wte.weight", DType::kF32, {50, 16}},
                            {p + "wpe.weight", DType::kF32, {8, 16}},
                            {p + "ln_f.weight", DType::kF32, {16}},
                            {p + "ln_f.bias", DType::kF32, {16}}};
  for (int l = 0; l < layers; ++l) {
    const std::string h = p + "h." + std::to_string(l) + ".";
    m.push_back({h + "ln_1.weight", DType::kF32, {16}});
    m.push_back({h + "ln_1.bias", DType::kF32, {16}});
    m.push_back({h + "attn.c_attn.weight", DType::kF32, {16, 48}});
    m.push_back({h + "attn.c_attn.bias", DType::kF32, {48}});
    m.push_back({h + "attn.c_proj.weight", DType::kF32, {16, 16}});
    m.push_back({h + "attn.c_proj.bias", DType::kF32, {16}});
    m.push_back({h + "attn.bias", DType::kF32, {1, 1, 8, 8}});
    m.push_back({h + "ln_2.weight", DType::kF32, {16}});
    m.push_back({h + "ln_2.bias", DType::kF32, {16}});
    m.push_back({h + "mlp.c_fc.weight", DType::kF32, {16, 64}});
    m.push_back({h + "mlp.c_fc.bias", DType::kF32, {64}});
    m.push_back({h + "mlp.c_proj.weight", DType::kF32, {64, 16}});
    m.push_back({h + "mlp.c_proj.bias", DType::kF32, {16}});
  }
  return m;
}

ModelConfig gpt2_config() {
  return parse_model_config(
      R"({"model_type": "gpt2", "n_embd": 16, "n_head": 4, "n_layer": 2, "vocab_size": 50, "n_positions": 8, "n_inner": null})",
      "config.json");
}

}  // namespace

TEST_CASE("model configs: llama and gpt2 keys, defaults and errors") {
  const auto l = parse_model_config(
      R"({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": false})",
      "c.json");
  CHECK(l.hidden == 4096);
  CHECK(l.kv_heads == 8);
  CHECK(l.head_dim == 128);
  CHECK(!l.tied_embeddings);
  const auto g = gpt2_config();
  CHECK(g.intermediate == 64);  // 4 x n_embd
  CHECK(g.tied_embeddings);
  CHECK(g.head_dim == 4);
  CHECK_THROWS_WITH_AS(
      parse_model_config(R"({"hidden_size": -1})", "c.json"),
      doctest::Contains("c.json: field 'hidden_size': expected a non-negative integer"), Error);
  CHECK_THROWS_WITH_AS(
      parse_model_config(R"({"num_attention_heads": 6, "num_key_value_heads": 4})", "c.json"),
      "c.json: num_attention_heads 6 is not a multiple of num_key_value_heads 4", Error);
  CHECK_THROWS_WITH_AS(parse_model_config("[1]", "c.json"),
                       "c.json: a model config must be a JSON object", Error);
  ModelConfig partial;
  partial.hidden = 8;
  CHECK_THROWS_WITH_AS(Schema::preset("llama", partial),
                       "schema preset 'llama': the model config lacks num_attention_heads", Error);
  CHECK_THROWS_WITH_AS(Schema::preset("bert", g),
                       "unknown schema preset 'bert' (presets: llama, gpt2, mlp)", Error);
}

TEST_CASE("the gpt2 preset binds HF GPT-2 names with and without the transformer. prefix") {
  const Schema s = Schema::preset("gpt2", gpt2_config());
  for (bool prefix : {false, true}) {
    auto metas = gpt2_metas(prefix, 2);
    if (prefix) metas.push_back({"lm_head.weight", DType::kF32, {50, 16}});
    const auto layout = s.bind(metas);
    CHECK(layout.tensors().size() == metas.size());
    // Packed q|k|v columns: keeping heads {1, 3} keeps columns of each of the three blocks.
    const Plan p = parse_plan(R"({"heads": [1, 3], "hidden": {"policy": "heterofl", "rate": 0.5}})",
                              layout, "p");
    const auto cts = client_tensors(layout, p);
    for (const auto& ct : cts) {
      if (ct.name.find("c_attn.weight") != std::string::npos) CHECK(ct.shape == Shape{8, 24});
      if (ct.name.find("c_attn.bias") != std::string::npos) CHECK(ct.shape == Shape{24});
      if (ct.name.find("attn.c_proj.weight") != std::string::npos) CHECK(ct.shape == Shape{8, 8});
      if (ct.name.find("attn.bias") != std::string::npos &&
          ct.name.find("c_") == std::string::npos) {
        CHECK(ct.shape == Shape{1, 1, 8, 8});
      }
      if (ct.name.find("wpe") != std::string::npos) CHECK(ct.shape == Shape{8, 8});
    }
  }
}

TEST_CASE("GPT-2's packed qkv columns are taken per block") {
  // c_attn.weight [in 16, out 3 x 4 heads x 4]: column value = column index.
  std::vector<NamedTensor> t;
  std::vector<float> cols(16 * 48);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 48; ++j) cols[i * 48 + j] = static_cast<float>(j);
  }
  t.push_back(edgefuse_test::f32_tensor("h.0.attn.c_attn.weight", {16, 48}, cols));
  const auto layout =
      Schema::from_json(
          R"({"axes": {"hidden": {"size": 16}, "heads": {"size": 4, "group": 4}}, "tensors": {"h.{layer}.attn.c_attn.weight": ["hidden", "3*heads"]}})",
          "s.json")
          .bind(edgefuse_test::metas_of(t));
  const auto c = extract(views_of(t), layout, parse_plan(R"({"heads": [2]})", layout, "p"));
  const auto v = edgefuse_test::values_of(c[0].tensor);
  CHECK(std::vector<float>(v.begin(), v.begin() + 12) ==
        std::vector<float>{8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43});
}

TEST_CASE("a schema that does not cover the checkpoint is rejected with the tensor named") {
  const Schema s = Schema::preset("gpt2", gpt2_config());
  auto metas = gpt2_metas(false, 2);
  metas.push_back({"h.0.attn.extra", DType::kF32, {3}});
  CHECK_THROWS_WITH_AS(s.bind(metas),
                       "schema: tensor 'h.0.attn.extra' matches no entry of the schema", Error);
  metas = gpt2_metas(false, 2);
  metas[4] = {"h.0.ln_1.weight", DType::kF32, {15}};
  CHECK_THROWS_WITH_AS(s.bind(metas),
                       "schema: tensor 'h.0.ln_1.weight' dimension 0 is 15 but axis 'hidden' gives "
                       "16 = 16 (entry 'h.{layer}.ln_1.weight')",
                       Error);
  metas = gpt2_metas(false, 3);  // the config says 2 layers
  CHECK_THROWS_WITH_AS(s.bind(metas),
                       doctest::Contains("is in layer 2 but the schema has 2 layers"), Error);
  metas = gpt2_metas(false, 1);
  metas[6] = {"h.0.attn.c_attn.weight", DType::kF32, {16, 48, 1}};
  CHECK_THROWS_WITH_AS(s.bind(metas), doctest::Contains("has shape [16, 48, 1] (rank 3) but entry"),
                       Error);
  const auto two = Schema::from_json(
      R"({"axes": {"a": {"size": 2}}, "tensors": {"x.{layer}": ["a"], "x.1": [null]}})", "s.json");
  CHECK_THROWS_WITH_AS(two.bind({{"x.1", DType::kF32, {2}}}),
                       "schema: tensor 'x.1' matches two entries, 'x.1' and 'x.{layer}'", Error);
  CHECK_THROWS_WITH_AS(two.bind({{"x.01", DType::kF32, {2}}}),
                       doctest::Contains("'x.01' matches no entry"), Error);
}

TEST_CASE("user schemas: bad JSON and bad entries are named") {
  CHECK_THROWS_WITH_AS(Schema::from_json(R"({"axes": {}, "tensors": {}, "x": 1})", "s.json"),
                       "s.json: unknown key 'x' (expected axes, tensors)", Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"size": 0}}, "tensors": {}})", "s.json"),
      doctest::Contains("s.json: axis 'a' size: 0 is outside [1,"), Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"group": 2}}, "tensors": {}})", "s.json"),
      "s.json: axis 'a': \"size\" is required", Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"size": 2}}, "tensors": {"w": ["b"]}})", "s.json"),
      "s.json: tensor 'w': unknown axis 'b'", Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"size": 2}}, "tensors": {"w.{layer}.{layer}": ["a"]}})",
                        "s.json"),
      "s.json: tensor 'w.{layer}.{layer}': more than one {layer}", Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"size": 2}}, "tensors": {"w": ["0*a"]}})", "s.json"),
      doctest::Contains("bad repeat in '0*a'"), Error);
  CHECK_THROWS_WITH_AS(
      Schema::from_json(R"({"axes": {"a": {"size": 2}, "a": {"size": 3}}, "tensors": {}})",
                        "s.json"),
      doctest::Contains("s.json"), Error);  // duplicate key
  CHECK_THROWS_WITH_AS(Schema::from_json("{", "s.json"), doctest::Contains("s.json"), Error);
  // Not strict JSON: a ConfigError with the file and what is wrong, and no io rule in the text.
  try {
    Schema::from_json(R"({"axes": {"a": {"size": 2}, "a": {"size": 3}}, "tensors": {}})", "s.json");
    FAIL("a duplicate key was accepted");
  } catch (const ConfigError& e) {
    CHECK(e.file() == "s.json");
    CHECK(std::string(e.what()) == "s.json: " + e.detail());
    CHECK(e.detail() == "JSON key 'a' appears twice in one object");
    CHECK(std::string(e.what()).find("(DuplicateKey)") == std::string::npos);
  }
  // A schema round-trips through its JSON form.
  const Schema g = Schema::preset("gpt2", gpt2_config());
  const Schema back = Schema::from_json(g.to_json(), "round-trip");
  CHECK(back.to_json() == g.to_json());
  CHECK(back.bind(gpt2_metas(true, 2)).tensors().size() == gpt2_metas(true, 2).size());
}

TEST_CASE("plans: policies resolve to explicit lists and bad plans are named") {
  const Schema s = Schema::from_json(edgefuse_test::kMatrixSchema, "m.json");
  std::vector<TensorMeta> metas{{"w", DType::kF32, {4, 6}}};
  const auto layout = s.bind(metas);
  const Plan p = parse_plan(
      R"({"out": {"policy": "fedrolex", "rate": "1/2", "round": 3}, "in": {"policy": "random", "count": 2, "seed": 1}})",
      layout, "p.json");
  CHECK(p.axes.at("out") == std::vector<std::uint32_t>{3, 0});
  CHECK(p.axes.at("in").size() == 2);
  const auto& in = p.axes.at("in");
  CHECK(plan_to_json(p) ==
        R"({"in":[)" + std::to_string(in[0]) + "," + std::to_string(in[1]) + R"(],"out":[3,0]})");
  auto bad = [&](const char* json, const char* msg) {
    CHECK_THROWS_WITH_AS(parse_plan(json, layout, "p.json"), doctest::Contains(msg), Error);
  };
  bad(R"({"out": [4]})", "p.json: axis 'out': index 4 at position 0 is out of range (axis size 4)");
  bad(R"({"out": [1, 1]})", "p.json: axis 'out': index 1 appears twice");
  bad(R"({"out": []})", "p.json: axis 'out': the index list is empty");
  bad(R"({"out": [-1]})", "p.json: axis 'out'[0]: expected a non-negative integer, got -1");
  bad(R"({"out": [0.5]})", "expected a non-negative integer, got 0.5");
  bad(R"({"mlp": [0]})", "p.json: axis 'mlp': not an axis of the schema (axes: in, out)");
  bad(R"({"out": {"policy": "magic", "rate": 0.5}})", "unknown policy 'magic'");
  bad(R"({"out": {"policy": "heterofl"}})", "needs exactly one of \"rate\" and \"count\"");
  bad(R"({"out": {"policy": "heterofl", "rate": 1.5}})",
      "p.json: axis 'out' rate: rate 1.5: expected a number in (0, 1]");
  bad(R"({"out": {"policy": "heterofl", "rate": 0.5, "round": 2}})",
      "unknown key 'round' for policy 'heterofl'");
  bad(R"({"out": {"policy": "fedrolex", "rate": 0.5}})", "policy 'fedrolex' needs \"round\"");
  bad(R"({"out": {"policy": "fedrolex", "rate": 0.5, "round": 1, "convention": "sideways"}})",
      "convention must be \"forward\" (paper) or \"backward\" (official code)");
  bad(R"({"out": {"policy": "random", "rate": 0.5}})", "policy 'random' needs \"seed\"");
  bad(R"({"out": {"policy": "heterofl", "count": 5}})", "count: 5 is outside [1, 4]");
  bad(R"({"aggregate_only": {"out": [7]}})",
      "p.json: aggregate_only 'out': index 7 at position 0 is out of range");
  bad(R"([1, 2])", "p.json: a plan must be a JSON object of axis names");
  bad(R"({"out": "all"})", "expected an index list or a policy object");
}
