// `edgefuse plan`, `edgefuse extract` and `edgefuse aggregate` (an alias of `fuse`) end to end on a
// small Llama-shaped checkpoint folder: the CLI's results equal the library's bit for bit, bad
// clients are rejected by name while the others are fused, and a failing job leaves the
// output untouched.
#include <cstring>
#include <random>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/io/checkpoint.h"
#include "tests/cli_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

#if defined(EDGEFUSE_CLI)

namespace {

using Run = ef::test::CliRun;
using ef::test::cli;
using ef::test::kConfig;
using ef::test::same_checkpoints;
using ef::test::write_target;

void write_file(const fs::path& file, const std::vector<ef::NamedTensor>& tensors) {
  const fs::path dir = file.string() + ".dir";
  ef::CheckpointWriter w(dir);
  for (const auto& t : tensors) w.add(t.name, t.tensor.view());
  w.commit();
  fs::rename(dir / "model.safetensors", file);
  fs::remove_all(dir);
}

const char* kPlans[] = {
    R"({"hidden": {"policy": "fedrolex", "rate": 0.25, "round": 30}, "kv_heads": {"policy": "fedrolex", "rate": 0.5, "round": 3}, "mlp": {"policy": "heterofl", "rate": "1/3"}, "layers": [1]})",
    R"({"hidden": {"policy": "random", "rate": 0.5, "seed": 4}, "heads": {"policy": "heterofl", "rate": 0.5}})",
    R"({"hidden": [3, 1, 2], "layers": {"policy": "stride", "count": 2}})",
};

}  // namespace

TEST_CASE("plan, extract and aggregate from the command line match the library bit for bit") {
  ef::test::ScratchDir dir;
  const fs::path target = dir / "target";
  write_target(target);
  const auto ckpt = ef::Checkpoint::open(target);
  const auto layout = ef::Schema::preset("llama", ef::parse_model_config(kConfig, "c"))
                          .bind(ef::tensor_metas(ckpt));
  for (std::size_t c = 0; c < std::size(kPlans); ++c) {
    ef::test::write_text(dir / ("plan" + std::to_string(c) + ".json"), kPlans[c]);
  }
  // plan: explicit lists.
  Run r = cli(dir, {"plan", "--schema", "llama", "--target", target.string(), "--plan",
                    (dir / "plan0.json").string()});
  REQUIRE(r.rc == 0);
  CHECK(
      r.out ==
      R"({"heads":[6,7,0,1],"hidden":[30,31,0,1,2,3,4,5],"kv_heads":[3,0],"layers":[1],"mlp":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]})"
      "\n");
  // plan with --config and no target.
  ef::test::write_text(dir / "config.json", kConfig);
  r = cli(dir, {"plan", "--schema", "llama", "--config", (dir / "config.json").string(), "--plan",
                (dir / "plan2.json").string()});
  REQUIRE(r.rc == 0);
  CHECK(r.out == R"({"hidden":[3,1,2],"layers":[0,1]})"
                 "\n");

  // extract: one file per client, equal to the library's extraction; then updates.
  std::vector<std::vector<ef::NamedTensor>> updates;
  for (std::size_t c = 0; c < std::size(kPlans); ++c) {
    const std::string plan = (dir / ("plan" + std::to_string(c) + ".json")).string();
    const fs::path file = dir / ("client" + std::to_string(c) + ".safetensors");
    r = cli(dir, {"extract", "--target", target.string(), "--schema", "llama", "--plan", plan,
                  "--out", file.string(), "--dtype", "f32"});
    REQUIRE(r.rc == 0);
    CHECK(r.out.find("extracted ") == 0);
    const ef::Plan p = ef::parse_plan(kPlans[c], layout, "p");
    auto local = ef::extract(ef::views_of(ckpt), layout, p, ef::DType::kF32);
    CHECK(same_checkpoints(ef::Checkpoint::open(file), local));
    for (auto& t : local) {
      float* x = t.tensor.view().data_as<float>();
      for (std::size_t i = 0; i < t.tensor.numel(); ++i)
        x[i] = 0.01f * static_cast<float>((i * 7 + c) % 13) - 0.05f;
    }
    write_file(dir / ("delta" + std::to_string(c) + ".safetensors"), local);
    if (c == 0) write_file(dir / "delta0-copy.safetensors", local);
    updates.push_back(std::move(local));
  }
  // A client with a NaN and one whose update has the wrong shapes (plan 1 given plan 0's
  // update, copied: the same file twice is rejected as such).
  {
    auto bad = ef::extract(ef::views_of(ckpt), layout, ef::parse_plan(kPlans[0], layout, "p"));
    bad[0].tensor.view().data_as<ef::BFloat16>()[3].bits = 0x7FC0;
    write_file(dir / "nan.safetensors", bad);
  }
  const std::string job =
      R"({"target": "target", "schema": "llama", "mode": "delta", "server_lr": 0.5,
    "output": "fused", "clients": [
      {"update": "delta0.safetensors", "plan": "plan0.json", "weight": 1},
      {"update": "nan.safetensors", "plan": "plan0.json"},
      {"update": "delta1.safetensors", "plan": "plan1.json", "weight": 3},
      {"update": "delta0-copy.safetensors", "plan": "plan1.json"},
      {"update": "delta2.safetensors", "plan": "plan2.json", "weight": 2}]})";
  ef::test::write_text(dir / "job.json", job);
  // `aggregate` is `fuse`: clients are named by their update's path in the job.
  r = cli(dir, {"aggregate", (dir / "job.json").string()});
  INFO(r.err);
  REQUIRE(r.rc == 0);
  CHECK(r.err.find("rejected client nan.safetensors: " + (dir / "nan.safetensors").string() +
                   ": tensor 'model.embed_tokens.weight' holds a non-finite value at element 3 "
                   "(client rejected)") != std::string::npos);
  CHECK(r.err.find("rejected client delta0-copy.safetensors: " +
                   (dir / "delta0-copy.safetensors").string() + ": tensor ") != std::string::npos);
  CHECK(r.out.find("fused 3 clients (2 rejected)") != std::string::npos);
  CHECK(r.out.find("model.layers.0.mlp.down_proj.weight") != std::string::npos);
  // The library on the same inputs.
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server_lr = 0.5f;
  ef::Aggregator agg(layout, opt);
  const float weights[] = {1, 3, 2};
  for (std::size_t c = 0; c < 3; ++c) {
    agg.add(ef::views_of(updates[c]), ef::parse_plan(kPlans[c], layout, "p"), weights[c], "c");
  }
  const auto want = agg.finalize(ef::views_of(ckpt));
  const auto fused = ef::Checkpoint::open(dir / "fused");
  CHECK(same_checkpoints(fused, want));
  CHECK(fs::exists(dir / "fused" / "config.json"));
  CHECK(!same_checkpoints(fused, ef::extract(ef::views_of(ckpt), layout, ef::Plan{})));

  // Running the job again without "replace" fails and leaves the fused output as it was.
  const std::string before = ef::test::read_text(dir / "fused" / "model.safetensors.index.json");
  r = cli(dir, {"aggregate", (dir / "job.json").string()});
  CHECK(r.rc == 2);
  CHECK(r.err.find("error: ") == 0);
  CHECK(ef::test::read_text(dir / "fused" / "model.safetensors.index.json") == before);
  CHECK(same_checkpoints(ef::Checkpoint::open(dir / "fused"), want));
}

TEST_CASE("bad jobs, plans and schemas exit 2 with one error line naming the file") {
  ef::test::ScratchDir dir;
  write_target(dir / "target");
  ef::test::write_text(dir / "plan.json", R"({"hidden": [32]})");
  Run r = cli(dir, {"plan", "--schema", "llama", "--target", (dir / "target").string(), "--plan",
                    (dir / "plan.json").string()});
  CHECK(r.rc == 2);
  CHECK(r.out.empty());
  CHECK(r.err == "error: " + (dir / "plan.json").string() +
                     ": axis 'hidden': index 32 at position 0 is out of range (axis size 32)\n");
  r = cli(dir, {"plan", "--schema", "gpt2", "--target", (dir / "target").string(), "--plan",
                (dir / "plan.json").string()});
  CHECK(r.rc == 2);
  CHECK(r.err.find("matches no entry of the schema") != std::string::npos);
  r = cli(dir, {"plan", "--schema", "llama", "--plan", (dir / "plan.json").string()});
  CHECK(r.rc == 2);
  CHECK(r.err == "error: schema preset 'llama' needs a model config: pass --config config.json\n");
  const std::pair<const char*, const char*> jobs[] = {
      {R"({"target": "target", "schema": "llama", "output": "o", "clients": [], "x": 1})",
       "unknown key 'x'"},
      {R"({"target": "target", "schema": "llama", "output": "o", "clients": []})",
       "job.json: \"clients\" must be a non-empty array"},
      {R"({"target": "target", "schema": "llama", "output": "o", "mode": "mean", "clients": [{}]})",
       "job.json: \"mode\" must be \"params\" or \"delta\", got \"mean\""},
      {R"({"target": "target", "schema": "llama", "output": "o", "clients": [{"update": "missing.safetensors", "plan": "plan.json"}]})",
       "no valid client contribution to fuse (1 rejected; first: missing.safetensors: "},
      {R"({"schema": "llama", "output": "o", "clients": [{}]})", "\"target\" is required"},
  };
  for (const auto& [text, msg] : jobs) {
    CAPTURE(text);
    ef::test::write_text(dir / "job.json", text);
    r = cli(dir, {"aggregate", (dir / "job.json").string()});
    INFO(r.err);
    CHECK(r.rc == 2);
    CHECK(r.err.find(msg) != std::string::npos);
    CHECK(!fs::exists(dir / "o"));
  }
}

#endif  // EDGEFUSE_CLI
