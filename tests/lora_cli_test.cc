// `edgefuse merge-lora` / `unmerge-lora` end to end on a sharded bf16 Llama-shaped folder: the
// CLI's output equals the library's bit for bit (plain merge, unmerge, a weighted cat of two
// adapters, a combined adapter written as a PEFT folder), and bad adapters or arguments exit 2
// with a message naming the folder and tensor while the output is left as it was.
#include <cmath>
#include <cstring>
#include <random>

#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"
#include "tests/cli_helpers.h"
#include "tests/error_of.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

#if defined(EDGEFUSE_CLI)

namespace {

using ef::test::cli;
using ef::test::same_checkpoints;

// A PEFT folder with LoRA on two linear modules and the (tied) embedding: r = 4, alpha = 8.
void write_adapter(const fs::path& dir, unsigned seed, float poison = 0.0f,
                   const std::string& up_module = "model.layers.1.mlp.up_proj") {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<ef::Tensor> keep;
  auto rand = [&](std::uint64_t r, std::uint64_t c) {
    ef::Tensor t = ef::Tensor::empty(ef::DType::kF32, ef::Shape{r, c});
    for (std::uint64_t i = 0; i < t.numel(); ++i) t.view().data_as<float>()[i] = nd(rng);
    keep.push_back(std::move(t));
    return keep.back().view();
  };
  std::vector<ef::LoraFactors> f;
  keep.reserve(8);
  f.push_back({"model.layers.0.self_attn.q_proj", rand(4, 32), rand(32, 4)});
  f.push_back({up_module, rand(4, 32), rand(48, 4)});
  f.push_back({"model.embed_tokens", rand(4, 40), rand(32, 4), ef::LoraPair::Kind::kEmbedding});
  if (poison != 0.0f) keep[1].view().data_as<float>()[5] = poison;
  ef::LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.target_modules = {"q_proj", "up_proj", "embed_tokens"};
  ef::write_peft_adapter(dir, c, f);
}

// The base checkpoint in memory.
std::vector<ef::NamedTensor> load_all(const fs::path& p) {
  const auto ck = ef::Checkpoint::open(p);
  std::vector<ef::NamedTensor> out;
  for (const auto& e : ck.tensors()) {
    const auto v = ck.view(e.info->name);
    ef::Tensor t = ef::Tensor::empty(v.dtype(), v.shape());
    std::memcpy(t.view().bytes(), v.bytes(), v.nbytes());
    out.push_back({e.info->name, std::move(t)});
  }
  return out;
}

void merge_in_memory(std::vector<ef::NamedTensor>& ts, const ef::LoraAdapter& a, double factor) {
  for (const auto& m : a.modules) {
    for (auto& t : ts) {
      if (t.name == m.weight_name()) ef::merge_lora(t.tensor.view(), m, factor);
    }
  }
}

}  // namespace

TEST_CASE("merge-lora and unmerge-lora equal the library bit for bit") {
  ef::test::ScratchDir dir;
  ef::test::write_target(dir / "base");
  write_adapter(dir / "a1", 1);
  write_adapter(dir / "a2", 2);
  const auto a1 = ef::load_lora_adapter(dir / "a1");
  const auto a2 = ef::load_lora_adapter(dir / "a2");
  CHECK(a1.modules.size() == 3);
  CHECK(a1.modules[0].scaling == 2.0);

  auto r = cli(dir, {"merge-lora", "--base", (dir / "base").string(), "--adapter",
                     (dir / "a1").string(), "--out", (dir / "merged").string()});
  CHECK(r.rc == 0);
  CHECK(r.out.find("merged 3 module(s) (plain, 1 adapter(s))") != std::string::npos);
  auto want = load_all(dir / "base");
  const auto base = load_all(dir / "base");
  merge_in_memory(want, a1, 1.0);
  CHECK(same_checkpoints(ef::Checkpoint::open(dir / "merged"), want));
  CHECK(fs::exists(dir / "merged" / "config.json"));
  // The merge changed the targeted weights and nothing else.
  for (std::size_t i = 0; i < base.size(); ++i) {
    const bool targeted = a1.find(base[i].name.substr(0, base[i].name.size() - 7)) != nullptr;
    const bool same = std::memcmp(base[i].tensor.view().bytes(), want[i].tensor.view().bytes(),
                                  base[i].tensor.nbytes()) == 0;
    CAPTURE(base[i].name);
    CHECK(same != targeted);
  }

  r = cli(dir, {"unmerge-lora", "--base", (dir / "merged").string(), "--adapter",
                (dir / "a1").string(), "--out", (dir / "restored").string()});
  CHECK(r.rc == 0);
  merge_in_memory(want, a1, -1.0);
  CHECK(same_checkpoints(ef::Checkpoint::open(dir / "restored"), want));

  // Two adapters, weighted: cat by default (the exact weighted sum, one rounding).
  r = cli(dir, {"merge-lora", "--base", (dir / "base").string(), "--adapter", (dir / "a1").string(),
                "--weight", "0.25", "--adapter", (dir / "a2").string(), "--weight", "0.75", "--out",
                (dir / "cat").string()});
  CHECK(r.rc == 0);
  const auto cat = ef::combine_adapters({&a1, &a2}, {0.25, 0.75}, {});
  auto want_cat = load_all(dir / "base");
  merge_in_memory(want_cat, cat, 1.0);
  CHECK(same_checkpoints(ef::Checkpoint::open(dir / "cat"), want_cat));

  // The combined adapter as a PEFT folder, read back with the same factors and scaling 1.
  r = cli(dir, {"merge-lora", "--base", (dir / "base").string(), "--adapter", (dir / "a1").string(),
                "--adapter", (dir / "a2").string(), "--combine", "svd", "--svd-rank", "3",
                "--out-adapter", (dir / "combined").string()});
  CHECK(r.rc == 0);
  ef::CombineOptions o;
  o.type = ef::CombinationType::kSvd;
  o.svd_rank = 3;
  const auto svd = ef::combine_adapters({&a1, &a2}, {1.0, 1.0}, o);
  const auto back = ef::load_lora_adapter(dir / "combined");
  REQUIRE(back.modules.size() == svd.modules.size());
  for (std::size_t i = 0; i < svd.modules.size(); ++i) {
    CHECK(back.modules[i].module == svd.modules[i].module);
    CHECK(back.modules[i].kind == svd.modules[i].kind);
    CHECK(back.modules[i].scaling == 1.0);
    CHECK(back.modules[i].rank() == 3);
    CHECK(std::memcmp(back.modules[i].a.view().bytes(), svd.modules[i].a.view().bytes(),
                      svd.modules[i].a.nbytes()) == 0);
    CHECK(std::memcmp(back.modules[i].b.view().bytes(), svd.modules[i].b.view().bytes(),
                      svd.modules[i].b.nbytes()) == 0);
  }
  CHECK_FALSE(back.config.use_rslora);
}

TEST_CASE("merge-lora rejects bad adapters and arguments and leaves the output untouched") {
  ef::test::ScratchDir dir;
  ef::test::write_target(dir / "base");
  write_adapter(dir / "good", 1);
  write_adapter(dir / "missing", 2, 0.0f, "model.layers.5.mlp.up_proj");
  write_adapter(dir / "nan", 3, NAN);
  const std::string base = (dir / "base").string(), out = (dir / "out").string();

  auto r = cli(
      dir, {"merge-lora", "--base", base, "--adapter", (dir / "missing").string(), "--out", out});
  CHECK(r.rc == 2);
  CHECK(r.err == "error: adapter '" + (dir / "missing").string() +
                     "': module 'model.layers.5.mlp.up_proj' targets "
                     "'model.layers.5.mlp.up_proj.weight', which the base checkpoint " +
                     (dir / "base" / "model.safetensors.index.json").string() + " does not have\n");
  CHECK_FALSE(fs::exists(out));

  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "nan").string(), "--out", out});
  CHECK(r.rc == 2);
  CHECK(r.err == "error: adapter '" + (dir / "nan").string() +
                     "': module 'model.layers.0.self_attn.q_proj': lora_B holds a non-finite "
                     "value at element 5\n");
  CHECK_FALSE(fs::exists(out));

  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "good").string(), "--adapter",
                (dir / "good").string(), "--combine", "average", "--out", out});
  CHECK(r.rc == 2);
  CHECK(r.err.find("error: unknown combination type 'average' (valid: cat, linear, svd") == 0);
  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "good").string(), "--adapter",
                (dir / "good").string(), "--combine", "ties", "--density", "0", "--out", out});
  CHECK(r.rc == 2);
  CHECK(r.err == "error: merge-lora: --density 0 is outside (0, 1]\n");
  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "good").string(), "--weight", "1",
                "--weight", "2", "--out", out});
  CHECK(r.rc == 2);
  CHECK(r.err ==
        "error: merge-lora: 2 --weight values for 1 --adapter folders (give one per "
        "adapter, or none)\n");
  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "good").string(), "--weight",
                "inf", "--out", out});
  CHECK(r.rc == 2);
  CHECK_FALSE(fs::exists(out));

  // An existing output is not replaced without --replace.
  r = cli(dir, {"merge-lora", "--base", base, "--adapter", (dir / "good").string(), "--out", out});
  REQUIRE(r.rc == 0);
  const auto before = load_all(out);
  r = cli(dir,
          {"unmerge-lora", "--base", base, "--adapter", (dir / "good").string(), "--out", out});
  CHECK(r.rc == 2);
  CHECK(same_checkpoints(ef::Checkpoint::open(out), before));
  r = cli(dir, {"unmerge-lora", "--base", base, "--adapter", (dir / "good").string(), "--out", out,
                "--replace"});
  CHECK(r.rc == 0);
  CHECK_FALSE(same_checkpoints(ef::Checkpoint::open(out), before));
}

TEST_CASE(
    "load_lora_adapter attaches DoRA magnitudes and refuses other extras instead of merging "
    "without them") {
  ef::test::ScratchDir dir;
  ef::Tensor a = ef::Tensor::zeros(ef::DType::kF32, ef::Shape{2, 4});
  ef::Tensor b = ef::Tensor::zeros(ef::DType::kF32, ef::Shape{3, 2});
  ef::Tensor mag = ef::Tensor::empty(ef::DType::kF32, ef::Shape{3});
  for (int i = 0; i < 3; ++i) mag.view().data_as<float>()[i] = 1.5f + static_cast<float>(i);
  ef::Tensor mag2 = ef::Tensor::zeros(ef::DType::kF32, ef::Shape{2});
  // A PEFT folder with one A/B pair on `proj`, optional extra tensors and the config's extra keys.
  auto write_adapter = [&](const std::string& folder,
                           const std::vector<std::pair<std::string, const ef::Tensor*>>& extras,
                           const std::string& config_keys) {
    ef::WriteOptions wo;
    wo.file_stem = "adapter_model";
    ef::CheckpointWriter w(dir / folder, wo);
    w.add("base_model.model.proj.lora_A.weight", a.view());
    w.add("base_model.model.proj.lora_B.weight", b.view());
    for (const auto& [name, t] : extras) w.add(name, t->view());
    w.add_file("adapter_config.json",
               R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2)" + config_keys + "}");
    w.commit();
    return dir / folder;
  };
  auto error_of_adapter = [&](const std::string& folder,
                              const std::vector<std::pair<std::string, const ef::Tensor*>>& extras,
                              const std::string& config_keys) {
    const fs::path p = write_adapter(folder, extras, config_keys);
    return edgefuse_test::error_of([&] { ef::load_lora_adapter(p); });
  };
  // The magnitude under each name PEFT releases and exporters use is attached to its module.
  for (const std::string name : {"base_model.model.proj.lora_magnitude_vector",
                                 "base_model.model.proj.lora_magnitude_vector.weight",
                                 "base_model.model.proj.lora_magnitude_vector.default",
                                 "base_model.model.proj.lora_magnitude_vector.default.weight"}) {
    const auto ad =
        ef::load_lora_adapter(write_adapter("dora", {{name, &mag}}, R"(, "use_dora": true)"));
    REQUIRE(ad.modules.size() == 1);
    CHECK(ad.modules[0].magnitude == std::vector<float>{1.5f, 2.5f, 3.5f});
    fs::remove_all(dir / "dora");
  }
  const std::string magname = "base_model.model.proj.lora_magnitude_vector.weight";
  CHECK(error_of_adapter("short", {{magname, &mag2}}, "") ==
        "adapter '" + (dir / "short").string() + "': tensor '" + magname +
            "' holds [2] but module 'proj' has 3 output features");
  CHECK(error_of_adapter("orphan", {{"base_model.model.other.lora_magnitude_vector", &mag}}, "") ==
        "adapter '" + (dir / "orphan").string() +
            "': tensor 'base_model.model.other.lora_magnitude_vector' is a "
            "DoRA magnitude of 'other', which has no lora_A / lora_B pair");
  CHECK(error_of_adapter("nomag", {}, R"(, "use_dora": true)") ==
        "adapter '" + (dir / "nomag").string() +
            "': adapter_config.json sets use_dora but module 'proj' has no "
            "lora_magnitude_vector");
  // A lora_B bias and a modules_to_save copy (PEFT saves it under the module's own name) are
  // refused.
  CHECK(error_of_adapter("bias", {{"base_model.model.proj.lora_B.bias", &mag}}, "") ==
        "adapter '" + (dir / "bias").string() +
            "': tensor 'base_model.model.proj.lora_B.bias' is a lora_bias "
            "term; merging lora_bias adapters is not supported");
  CHECK(error_of_adapter("mts", {{"base_model.model.head.weight", &b}},
                         R"(, "modules_to_save": ["head"])") ==
        "adapter '" + (dir / "mts").string() +
            "': tensor 'base_model.model.head.weight' is not a LoRA factor (a "
            "modules_to_save copy or another PEFT extra); merging it is not supported");
  // The same folder without the extras loads as plain LoRA.
  CHECK(error_of_adapter("plain", {}, "") == "(no error)");
  CHECK_FALSE(ef::load_lora_adapter(dir / "plain").modules[0].dora());
}

TEST_CASE("merge-lora merges a PEFT DoRA adapter streamed, bit for bit as merge_dora") {
  ef::test::ScratchDir dir;
  // The golden DoRA case: W0 = [[1, 0], [0, 2]], ΔW = [[0, 1], [0, 0]], m = [1.5, 2].
  const std::vector<float> w0{1, 0, 0, 2};
  {
    ef::CheckpointWriter cw(dir / "small");
    cw.add("proj.weight", ef::ConstTensorView(w0.data(), ef::DType::kF32, ef::Shape{2, 2}));
    cw.commit();
  }
  const std::vector<float> av{0, 1}, bv{1, 0}, mv{1.5f, 2.0f};
  {
    ef::WriteOptions wo;
    wo.file_stem = "adapter_model";
    ef::CheckpointWriter w(dir / "dora", wo);
    w.add("base_model.model.proj.lora_A.weight",
          ef::ConstTensorView(av.data(), ef::DType::kF32, ef::Shape{1, 2}));
    w.add("base_model.model.proj.lora_B.weight",
          ef::ConstTensorView(bv.data(), ef::DType::kF32, ef::Shape{2, 1}));
    w.add("base_model.model.proj.lora_magnitude_vector.weight",
          ef::ConstTensorView(mv.data(), ef::DType::kF32, ef::Shape{2}));
    w.add_file("adapter_config.json",
               R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "use_dora": true})");
    w.commit();
  }
  auto r = ef::test::cli(dir, {"merge-lora", "--base", (dir / "small").string(), "--adapter",
                               (dir / "dora").string(), "--out", (dir / "merged").string()});
  INFO(r.err);
  REQUIRE(r.rc == 0);
  {
    const auto out = ef::Checkpoint::open(dir / "merged");
    const float* got = out.view("proj.weight").data_as<float>();
    CHECK(got[0] == doctest::Approx(1.06066).epsilon(1e-5));
    CHECK(got[1] == doctest::Approx(1.06066).epsilon(1e-5));
    CHECK(got[2] == 0.0f);
    CHECK(got[3] == 2.0f);
  }
  // Unmerging a DoRA adapter would need the norms cached at merge time.
  r = ef::test::cli(dir, {"unmerge-lora", "--base", (dir / "merged").string(), "--adapter",
                          (dir / "dora").string(), "--out", (dir / "back").string()});
  CHECK(r.rc == 2);
  CHECK(r.err.find("module 'proj' is a DoRA module; it can be merged but not unmerged") !=
        std::string::npos);
  CHECK_FALSE(fs::exists(dir / "back"));

  // A 300 x 200 bf16 weight, rank 3, pieces of 1000 bytes (cutting rows): the streamed merge
  // equals merge_dora in memory bit for bit, for the (out, in) and the fan_in_fan_out layout.
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const bool fifo : {false, true}) {
    const std::uint64_t out_f = 300, in_f = 200, rank = 3;
    ef::Tensor w =
        ef::Tensor::empty(ef::DType::kBF16, fifo ? ef::Shape{in_f, out_f} : ef::Shape{out_f, in_f});
    for (std::uint64_t i = 0; i < w.numel(); ++i)
      w.view().data_as<ef::BFloat16>()[i] = ef::to_bf16(u(gen));
    ef::Tensor a = ef::Tensor::empty(ef::DType::kF32, ef::Shape{rank, in_f});
    ef::Tensor b = ef::Tensor::empty(ef::DType::kF32, ef::Shape{out_f, rank});
    for (std::uint64_t i = 0; i < a.numel(); ++i) a.view().data_as<float>()[i] = 0.1f * u(gen);
    for (std::uint64_t i = 0; i < b.numel(); ++i) b.view().data_as<float>()[i] = 0.1f * u(gen);
    const std::string base_dir = fifo ? "bt" : "b";
    {
      ef::CheckpointWriter cw(dir / base_dir);
      cw.add("proj.weight", w.view());
      cw.commit();
    }
    ef::LoraAdapter ad;
    ad.label = "dora-mem";
    ad.modules.push_back(ef::make_lora_module("proj", a.view(), b.view(), 0.5, "dora-mem",
                                              ef::LoraPair::Kind::kLinear, fifo));
    for (std::uint64_t i = 0; i < out_f; ++i)
      ad.modules[0].magnitude.push_back(1.0f + 0.01f * static_cast<float>(i));
    const auto base = ef::Checkpoint::open(dir / base_dir);
    ef::WriteOptions wo;
    wo.chunk_bytes = 1000;
    {
      ef::CheckpointWriter writer(dir / (base_dir + "-merged"), wo);
      ef::merge_lora_into(writer, base, ad);
      writer.commit();
    }
    ef::merge_lora(w.view(), ad.modules[0]);  // DoRA: merge_dora in memory
    const auto merged = ef::Checkpoint::open(dir / (base_dir + "-merged"));
    CAPTURE(fifo);
    CHECK(std::memcmp(merged.view("proj.weight").bytes(), w.view().bytes(), w.nbytes()) == 0);
    // Combining or saving a DoRA adapter is refused.
    CHECK(
        edgefuse_test::error_of([&] {
          ef::combine_adapters({&ad, &ad}, {0.5, 0.5}, {});
        }) ==
        "combine_adapters: adapter 'dora-mem': module 'proj' is a DoRA module (it has a magnitude "
        "vector); only merging applies to DoRA adapters");
  }
}

TEST_CASE("merge_lora_into streams: no allocation near the size of the merged weight") {
  ef::test::ScratchDir dir;
  // One 2048 x 1024 bf16 weight (4 MiB) and a rank-8 adapter on it.
  ef::Tensor w = ef::Tensor::zeros(ef::DType::kBF16, ef::Shape{2048, 1024});
  {
    ef::CheckpointWriter cw(dir / "base");
    cw.add("proj.weight", w.view());
    cw.commit();
  }
  ef::Tensor a = ef::Tensor::empty(ef::DType::kF32, ef::Shape{8, 1024});
  ef::Tensor b = ef::Tensor::empty(ef::DType::kF32, ef::Shape{2048, 8});
  for (std::uint64_t i = 0; i < a.numel(); ++i)
    a.view().data_as<float>()[i] = 0.01f * static_cast<float>(i % 7);
  for (std::uint64_t i = 0; i < b.numel(); ++i)
    b.view().data_as<float>()[i] = 0.02f * static_cast<float>(i % 5);
  ef::LoraAdapter ad;
  ad.label = "streamed";
  ad.modules.push_back(ef::make_lora_module("proj", a.view(), b.view(), 1.0, "streamed"));
  const auto base = ef::Checkpoint::open(dir / "base");
  ef::WriteOptions wo;
  wo.chunk_bytes = 64 << 10;
  std::size_t largest = 0;
  {
    ef::CheckpointWriter writer(dir / "out", wo);
    largest = ef::test::largest_allocation_during([&] {
      ef::merge_lora_into(writer, base, ad);
      writer.commit();
    });
  }
  ef::merge_lora(w.view(), ad.modules[0]);
  const auto out = ef::Checkpoint::open(dir / "out");
  CHECK(std::memcmp(out.view("proj.weight").bytes(), w.view().bytes(), w.nbytes()) == 0);
  // 0 means the sanitizer build, whose allocator cannot be probed.
  CHECK(largest < (std::size_t{1} << 20));
}
#endif  // EDGEFUSE_CLI
