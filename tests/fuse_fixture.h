// Shared by the fusion tests: a scratch folder with a small Llama-shaped bf16 target in
// target/, two sub-model updates a.update and b.update with their plans, a LoRA folder c.lora,
// and helpers to write jobs and compare outputs.
#pragma once

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "edgefuse/extract/extract.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"
#include "tests/cli_helpers.h"

#if defined(EDGEFUSE_CLI)
namespace edgefuse::test {

namespace ef = edgefuse;
namespace fs = std::filesystem;

inline const char* kPlanA =
    R"({"hidden": {"policy": "fedrolex", "rate": 0.5, "round": 3}, "heads": {"policy": "heterofl", "rate": 0.5}, "kv_heads": {"policy": "heterofl", "rate": 0.5}})";
inline const char* kPlanB =
    R"({"hidden": {"policy": "heterofl", "rate": 0.75}, "mlp": {"policy": "heterofl", "rate": "1/3"}})";

// Saves a rank-2 PEFT LoRA adapter on `module` (a weight of out x in) with the factors given
// (A: 2 x in, B: out x 2, row-major) and lora_alpha `alpha`.
inline void save_rank2_lora(const fs::path& folder, const std::string& module,
                            const std::vector<float>& a, const std::vector<float>& b,
                            std::uint64_t in, std::uint64_t out, double alpha) {
  ef::LoraAdapter ad;
  ad.config.r = 2;
  ad.config.lora_alpha = alpha;
  ad.label = folder.filename().string();
  ad.modules.push_back(ef::make_lora_module(
      module, ef::ConstTensorView(a.data(), ef::DType::kF32, ef::Shape{2, in}),
      ef::ConstTensorView(b.data(), ef::DType::kF32, ef::Shape{out, 2}), alpha / 2, ad.label));
  ef::save_lora_adapter(folder, ad);
}

struct Fixture {
  ef::test::ScratchDir dir;
  ef::Checkpoint ckpt;
  ef::ModelLayout layout;
  std::vector<std::vector<ef::NamedTensor>> updates;

  Fixture()
      : ckpt((write_target(dir / "target"), ef::Checkpoint::open(dir / "target"))),
        layout(ef::Schema::preset("llama", ef::parse_model_config(kConfig, "c"))
                   .bind(ef::tensor_metas(ckpt))) {
    ef::test::write_text(dir / "a.plan.json", kPlanA);
    ef::test::write_text(dir / "b.plan.json", kPlanB);
    for (const auto& [name, plan] : {std::pair{"a", kPlanA}, std::pair{"b", kPlanB}}) {
      auto local = ef::extract(ef::views_of(ckpt), layout, ef::parse_plan(plan, layout, "p"),
                               ef::DType::kF32);
      for (auto& t : local) {
        float* x = t.tensor.view().data_as<float>();
        for (std::size_t i = 0; i < t.tensor.numel(); ++i) {
          x[i] = 0.01f * static_cast<float>((i * 7 + name[0]) % 13) - 0.05f;
        }
      }
      ef::CheckpointWriter w(dir / (std::string(name) + ".update"));
      for (const auto& t : local) w.add(t.name, t.tensor.view());
      w.commit();
      updates.push_back(std::move(local));
    }
    // A rank-2 LoRA on plan A's q_proj of layer 1 (sub-model shapes).
    const auto sub = ef::extract(ef::views_of(ckpt), layout, ef::parse_plan(kPlanA, layout, "p"));
    const ef::NamedTensor* q = nullptr;
    for (const auto& t : sub) {
      if (t.name == "model.layers.1.self_attn.q_proj.weight") q = &t;
    }
    REQUIRE(q != nullptr);
    const std::uint64_t out = q->tensor.shape()[0], in = q->tensor.shape()[1];
    std::vector<float> a(2 * in), b(out * 2);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.1f * static_cast<float>(i % 5) - 0.2f;
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = 0.05f * static_cast<float>(i % 7) - 0.1f;
    save_rank2_lora(dir / "c.lora", "model.layers.1.self_attn.q_proj", a, b, in, out, 4.0);
  }

  fs::path job(const std::string& clients, const std::string& extra = "") {
    const fs::path p = dir / "job.json";
    ef::test::write_text(
        p, R"({"target": "target", "schema": "llama", "output": "fused", "replace": true,
      "mode": "delta", "server_lr": 0.5)" +
               extra + R"(, "clients": [)" + clients + "]}");
    return p;
  }
};

inline std::string bytes_of(const fs::path& ckpt_dir) {
  const auto c = ef::Checkpoint::open(ckpt_dir);
  std::string all;
  for (const auto& e : c.tensors()) {
    const auto v = c.view(e.info->name);
    all += e.info->name;
    all.append(reinterpret_cast<const char*>(v.bytes()), v.nbytes());
  }
  return all;
}

inline const std::string kUpdates =
    R"({"name": "a", "update": "a.update", "plan": "a.plan.json", "weight": 2},
       {"name": "b", "update": "b.update", "plan": "b.plan.json", "weight": 3})";
inline const std::string kLora =
    R"({"name": "c", "adapter": "c.lora", "plan": "a.plan.json", "weight": 5})";

// Writes a.plan.json, a.update, b.plan.json and b.update into `dir`: plans A and B's
// sub-models of `ckpt` with each bf16 value's bits xor'ed with (element index % mod). Returns
// the job's "clients" entries (weight 2 each).
inline std::string write_xor_updates(const fs::path& dir, const ef::Checkpoint& ckpt,
                                     const ef::ModelLayout& layout, unsigned mod) {
  std::string clients;
  for (const auto& [name, plan] : {std::pair{"a", kPlanA}, std::pair{"b", kPlanB}}) {
    ef::test::write_text(dir / (std::string(name) + ".plan.json"), plan);
    auto local = ef::extract(ef::views_of(ckpt), layout, ef::parse_plan(plan, layout, "p"));
    for (auto& t : local) {
      auto* x = t.tensor.view().data_as<ef::BFloat16>();
      for (std::size_t i = 0; i < t.tensor.numel(); ++i)
        x[i].bits ^= static_cast<std::uint16_t>(i % mod);
    }
    ef::CheckpointWriter w(dir / (std::string(name) + ".update"));
    for (const auto& t : local) w.add(t.name, t.tensor.view());
    w.commit();
    clients += std::string(clients.empty() ? "" : ",") + R"({"name": ")" + name +
               R"(", "update": ")" + name + R"(.update", "plan": ")" + name +
               R"(.plan.json", "weight": 2})";
  }
  return clients;
}

// A job of the fixture's two updates writing to `output` (relative to the fixture folder).
inline fs::path job_to(const Fixture& f, const std::string& output) {
  const fs::path p = f.dir / "job-out.json";
  ef::test::write_text(p, R"({"target": "target", "schema": "llama", "output": ")" + output +
                              R"(", "replace": true, "clients": [)" + kUpdates + "]}");
  return p;
}

// Entries of `folder` (the output, its staging folders, lock and report files).
inline std::vector<std::string> entries(const fs::path& folder) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(folder)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace edgefuse::test
#endif  // EDGEFUSE_CLI
