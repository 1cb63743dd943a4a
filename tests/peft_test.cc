// PEFT adapter folders: adapter_config.json semantics (rank/alpha patterns, rsLoRA), factor
// pairing and names, round trips and the errors of malformed adapters.
#include "edgefuse/io/peft.h"

#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using ef::CheckpointRule;
using ef::test::rule_of;

namespace {

// adapter_config.json as PEFT 0.13 writes it for a Llama LoRA, with patterns.
const char* kConfig = R"({
  "alpha_pattern": {"q_proj": 32},
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 4, "q_proj": 2},
  "target_modules": ["q_proj", "v_proj"],
  "task_type": "CAUSAL_LM",
  "use_rslora": false
})";

CheckpointRule config_rule(const std::string& text) {
  return rule_of([&] { ef::parse_lora_config(text, "adapter_config.json"); });
}

}  // namespace

TEST_CASE("adapter_config.json: PEFT's pattern rules give per-module rank, alpha and scaling") {
  const ef::LoraConfig c = ef::parse_lora_config(kConfig, "adapter_config.json");
  CHECK(c.r == 8);
  CHECK(c.lora_alpha == 16);
  CHECK(c.base_model_name_or_path == "meta-llama/Llama-3.2-1B");
  CHECK(c.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK_FALSE(c.target_modules_pattern.has_value());
  CHECK_FALSE(c.use_rslora);
  CHECK_FALSE(c.fan_in_fan_out);
  REQUIRE(c.rank_pattern.size() == 2);
  CHECK(c.rank_pattern[0].first == "layers\\.0\\.self_attn\\.q_proj");  // file order kept
  // First matching key in file order, suffix match on a dot boundary.
  CHECK(c.rank_for("model.layers.0.self_attn.q_proj") == 4);
  CHECK(c.rank_for("model.layers.10.self_attn.q_proj") == 2);
  CHECK(c.rank_for("model.layers.0.self_attn.v_proj") == 8);
  CHECK(c.rank_for("model.layers.0.self_attn.xq_proj") == 8);  // no dot boundary: no match
  CHECK(c.alpha_for("model.layers.3.self_attn.q_proj") == 32);
  CHECK(c.alpha_for("model.layers.3.self_attn.v_proj") == 16);
  CHECK(c.scaling_for("model.layers.0.self_attn.q_proj") == 8.0);   // 32 / 4
  CHECK(c.scaling_for("model.layers.5.self_attn.q_proj") == 16.0);  // 32 / 2
  CHECK(c.scaling_for("model.layers.5.self_attn.v_proj") == 2.0);   // 16 / 8
  ef::LoraConfig rs = c;
  rs.use_rslora = true;
  CHECK(rs.scaling_for("model.layers.5.self_attn.v_proj") == 16.0 / std::sqrt(8.0));
  // r = 2, alpha = 4 gives 4/√2 = 2.828427 with rsLoRA, 2 without.
  ef::LoraConfig small;
  small.r = 2;
  small.lora_alpha = 4;
  CHECK(small.scaling_for("m") == 2.0);
  small.use_rslora = true;
  CHECK(small.scaling_for("m") == doctest::Approx(2.828427).epsilon(1e-6));
  // Unknown keys are kept verbatim and written back.
  CHECK(c.other.at("task_type") == "\"CAUSAL_LM\"");
  CHECK(c.other.at("lora_dropout") == "0.05");
  const ef::LoraConfig back = ef::parse_lora_config(ef::lora_config_json(c), "again");
  CHECK(back.rank_pattern == c.rank_pattern);
  CHECK(back.alpha_pattern == c.alpha_pattern);
  CHECK(back.other == c.other);
  CHECK(back.r == 8);
  CHECK(nlohmann::json::parse(ef::lora_config_json(c))["lora_alpha"].is_number_integer());
  // A string target_modules is a regex (or "all-linear").
  CHECK(ef::parse_lora_config(R"({"target_modules":"all-linear"})", "c").target_modules_pattern ==
        "all-linear");
  // Defaults when keys are absent: r = 8, alpha = 8, s = 1.
  CHECK(ef::parse_lora_config("{}", "c").scaling_for("any") == 1.0);
}

TEST_CASE("adapter_config.json errors name the key and rule") {
  CHECK(config_rule(R"({"peft_type":"IA3"})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"r":0})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"r":"8"})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"r":8.5})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"lora_alpha":"x"})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"use_rslora":1})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"rank_pattern":{"(":4}})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"rank_pattern":{"q":-4}})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"target_modules":[1]})") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule(R"({"r":8,"r":16})") == CheckpointRule::kDuplicateKey);
  CHECK(config_rule("[]") == CheckpointRule::kInvalidAdapter);
  CHECK(config_rule("{") == CheckpointRule::kInvalidAdapter);
  try {
    ef::parse_lora_config(R"({"r":0})", "a/adapter_config.json");
  } catch (const ef::CheckpointError& e) {
    CHECK(std::string(e.what()) ==
          "a/adapter_config.json: r must be an integer in [1, 1048576], got 0 (InvalidAdapter)");
  }
}

TEST_CASE("peft_tensor_name is PEFT's saved key") {
  CHECK(ef::peft_tensor_name("model.layers.0.self_attn.q_proj", 'A') ==
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(ef::peft_tensor_name("transformer.h.1.attn.c_attn", 'B') ==
        "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight");
}

TEST_CASE("an adapter written by write_peft_adapter reads back with its pairs and bytes") {
  ef::test::ScratchDir dir;
  ef::LoraConfig c = ef::parse_lora_config(kConfig, "cfg");
  // q_proj of layer 0 has r = 4, v_proj r = 8.
  ef::Tensor qa = ef::Tensor::zeros(ef::DType::kF32, {4, 6});
  ef::Tensor qb = ef::Tensor::zeros(ef::DType::kF32, {10, 4});
  ef::Tensor va = ef::Tensor::zeros(ef::DType::kBF16, {8, 6});
  ef::Tensor vb = ef::Tensor::zeros(ef::DType::kBF16, {3, 8});
  for (std::uint64_t i = 0; i < 24; ++i) qa.view().data_as<float>()[i] = 0.5f * i;
  for (std::uint64_t i = 0; i < 40; ++i) qb.view().data_as<float>()[i] = -1.0f * i;
  for (std::uint64_t i = 0; i < 48; ++i) va.view().data_as<ef::BFloat16>()[i].bits = 0x3f80 + i;
  for (std::uint64_t i = 0; i < 24; ++i) vb.view().data_as<ef::BFloat16>()[i].bits = 0xbf80 + i;
  const auto files =
      ef::write_peft_adapter(dir / "adapter", c,
                             {{"model.layers.0.self_attn.q_proj", qa.view(), qb.view()},
                              {"model.layers.0.self_attn.v_proj", va.view(), vb.view()}});
  CHECK(files == std::vector<std::string>{"adapter_model.safetensors", "adapter_config.json"});

  const auto a = ef::PeftAdapter::open(dir / "adapter");
  CHECK(a.config().other.at("task_type") == "\"CAUSAL_LM\"");
  CHECK(a.checkpoint().shards()[0].metadata().at("format") == "pt");
  REQUIRE(a.pairs().size() == 2);
  const ef::LoraPair& q = a.pairs()[0];
  CHECK(q.kind == ef::LoraPair::Kind::kLinear);
  CHECK(q.module == "model.layers.0.self_attn.q_proj");
  CHECK(q.base_weight == "model.layers.0.self_attn.q_proj.weight");
  CHECK(q.a_name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(q.rank == 4);
  CHECK(q.alpha == 32);
  CHECK(q.scaling == 8.0);
  CHECK(q.in_features == 6);
  CHECK(q.out_features == 10);
  CHECK(std::memcmp(a.a(q).data(), qa.view().data(), 96) == 0);
  CHECK(std::memcmp(a.b(q).data(), qb.view().data(), 160) == 0);
  const ef::LoraPair& v = a.pairs()[1];
  CHECK(v.rank == 8);
  CHECK(v.scaling == 2.0);
  CHECK(a.b(v).dtype() == ef::DType::kBF16);
  CHECK(std::memcmp(a.b(v).data(), vb.view().data(), 48) == 0);
  CHECK(a.other_tensors().empty());
  // Shapes that disagree with the config are refused before anything is written.
  CHECK(rule_of([&] {
          ef::write_peft_adapter(dir / "bad", c,
                                 {{"model.layers.3.self_attn.v_proj", qa.view(), qb.view()}});
        }) == CheckpointRule::kInvalidArgument);
  CHECK_FALSE(fs::exists(dir / "bad"));
}

namespace {

void write_adapter(const fs::path& folder, const std::string& config,
                   const std::vector<std::pair<std::string, ef::Shape>>& tensors,
                   ef::DType dtype = ef::DType::kF32) {
  ef::WriteOptions opt;
  opt.file_stem = "adapter_model";
  ef::CheckpointWriter w(folder, opt);
  for (const auto& [name, shape] : tensors) {
    w.add(name, dtype, shape,
          [](std::uint64_t, std::byte* d, std::size_t n) { std::memset(d, 0, n); });
  }
  w.add_file("adapter_config.json", config);
  w.commit();
}

}  // namespace

TEST_CASE("embedding factors pair with their base weight, other tensors are listed apart") {
  ef::test::ScratchDir dir;
  write_adapter(dir / "a", R"({"r":2,"lora_alpha":4})",
                {{"base_model.model.model.embed_tokens.lora_embedding_A", {2, 100}},
                 {"base_model.model.model.embed_tokens.lora_embedding_B", {16, 2}},
                 {"base_model.model.lm_head.weight", {100, 16}},
                 {"base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", {32}}});
  const auto a = ef::PeftAdapter::open(dir / "a");
  REQUIRE(a.pairs().size() == 1);
  CHECK(a.pairs()[0].kind == ef::LoraPair::Kind::kEmbedding);
  CHECK(a.pairs()[0].base_weight == "model.embed_tokens.weight");
  CHECK(a.pairs()[0].in_features == 100);
  CHECK(a.pairs()[0].out_features == 16);
  CHECK(a.pairs()[0].scaling == 2.0);
  CHECK(a.other_tensors() ==
        std::vector<std::string>{
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"});
}

TEST_CASE("malformed adapters: lone factors, rank mismatches, wrong rank or dtype, no weights") {
  ef::test::ScratchDir dir;
  const std::string a = "base_model.model.m.lora_A.weight";
  const std::string b = "base_model.model.m.lora_B.weight";
  write_adapter(dir / "lone", R"({"r":2})", {{a, {2, 4}}});
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "lone"); }) == CheckpointRule::kInvalidAdapter);
  write_adapter(dir / "rank", R"({"r":4})", {{a, {2, 4}}, {b, {3, 2}}});
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "rank"); }) == CheckpointRule::kInvalidAdapter);
  write_adapter(dir / "ab", R"({"r":2})", {{a, {2, 4}}, {b, {3, 3}}});
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "ab"); }) == CheckpointRule::kInvalidAdapter);
  write_adapter(dir / "1d", R"({"r":2})", {{a, {8}}, {b, {3, 2}}});
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "1d"); }) == CheckpointRule::kInvalidAdapter);
  write_adapter(dir / "int", R"({"r":2})", {{a, {2, 4}}, {b, {3, 2}}}, ef::DType::kI32);
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "int"); }) == CheckpointRule::kInvalidAdapter);
  fs::create_directories(dir / "noweights");
  ef::test::write_text(dir / "noweights" / "adapter_config.json", "{}");
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "noweights"); }) ==
        CheckpointRule::kNoCheckpoint);
  CHECK(rule_of([&] { ef::PeftAdapter::open(dir / "absent"); }) == CheckpointRule::kIo);
}
