// The adversarial suite: what a hostile or careless user can hand the edgefuse program, and
// what it must then never do (docs/reliability.md lists the promises). Each case builds its own
// scratch folder: a small Llama-shaped bf16 target in target/, updates a.update and b.update
// with their plans, a LoRA folder c.lora and a job fusing them. Families: output paths that
// are, contain or lie inside an input; reports; symbolic and hard links; overflow; hostile
// adapter patterns; resource limits; and unclear messages.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "edgefuse/engine/fuse.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/io/output_guard.h"
#include "edgefuse/io/peft.h"
#include "edgefuse/lora/adapter.h"
#include "tests/cli_helpers.h"
#include "tests/error_of.h"
#include "tests/fuse_fixture.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

#if defined(EDGEFUSE_CLI)

namespace {

using ef::test::bytes_of;
using ef::test::Fixture;
using ef::test::kConfig;
using ef::test::kLora;
using ef::test::kPlanA;
using ef::test::kUpdates;

// Every regular file below `dir` with its bytes (the harness's stdout.txt and stderr.txt
// aside): what "nothing was touched" compares.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name == "stdout.txt" || name == "stderr.txt") continue;
    // A writer's lock file (empty, beside its destination) is all a refused write may leave.
    if (name.size() > 14 && name.compare(name.size() - 14, 14, ".edgefuse-lock") == 0) continue;
    out[fs::relative(e.path(), dir).string()] = ef::test::read_text(e.path());
  }
  return out;
}

// A job of the fixture's updates and adapter with the given output and extra keys.
fs::path write_job(const Fixture& f, const std::string& output, const std::string& extra = "",
                   const std::string& clients = kUpdates + ", " + kLora) {
  const fs::path p = f.dir / "job.json";
  ef::test::write_text(p, R"({"target": "target", "schema": "llama", "output": ")" + output +
                              R"(")" + extra + R"(, "clients": [)" + clients + "]}");
  return p;
}

ef::test::CliRun fuse(const Fixture& f, const fs::path& job) {
  return ef::test::cli(f.dir, {"fuse", job.string(), "--quiet"});
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE(
    "adversarial paths: an output that is, contains or lies inside an input is refused, nothing "
    "touched") {
  Fixture f;
  fs::create_directory(f.dir / "sub");
  fs::create_directory_symlink("target", f.dir / "target-link");
  const auto before = snapshot(f.dir.path());
  struct Case {
    std::string output, why;
  };
  const std::vector<Case> cases = {
      {"target", "the output is the target ("},
      {"target-link", "the output is the target ("},
      {"./target/", "the output is the target ("},
      {".", "the output contains the job file ("},
      {"..", "the output contains the job file ("},
      {"a.update", "the output is the update of client 'a' ("},
      {"c.lora", "the output is the adapter of client 'c' ("},
      {"target/fused", "the output lies inside the target ("},
  };
  for (const auto& c : cases) {
    CAPTURE(c.output);
    const auto r = fuse(f, write_job(f, c.output, R"(, "replace": true)"));
    CAPTURE(r.err);
    CHECK(r.rc == 2);
    CHECK(contains(r.err, c.why));
    CHECK(contains(r.err, "which this command reads; choose another path (InvalidArgument)"));
    auto now = snapshot(f.dir.path());
    now.erase("job.json");
    auto want = before;
    CHECK(now == want);
  }
  // edgefuse aggregate takes the same rule.
  ef::test::write_text(f.dir / "agg.json",
                       R"({"target": "target", "schema": "llama", "output": "target",
      "replace": true, "clients": [{"update": "a.update", "plan": "a.plan.json"}]})");
  auto r = ef::test::cli(f.dir, {"aggregate", (f.dir / "agg.json").string()});
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "the output is the target ("));
  // merge-lora --out <base> and --out . with --replace.
  for (const std::string out : {"target", "."}) {
    CAPTURE(out);
    r = ef::test::cli(f.dir,
                      {"merge-lora", "--base", (f.dir / "target").string(), "--adapter",
                       (f.dir / "c.lora").string(), "--out", (f.dir / out).string(), "--replace"});
    CHECK(r.rc == 2);
    CHECK(contains(r.err, out == "." ? "the output contains " : "the output is the base ("));
  }
  auto now = snapshot(f.dir.path());
  for (const char* k : {"job.json", "agg.json"}) now.erase(k);
  CHECK(now == before);
}

TEST_CASE(
    "adversarial paths: replace takes only a checkpoint folder, never one with subfolders or "
    "without weights") {
  Fixture f;
  fs::create_directories(f.dir / "notes" / "drafts");
  ef::test::write_text(f.dir / "notes" / "todo.txt", "keep me");
  ef::test::write_text(f.dir / "notes" / "drafts" / "a.txt", "keep me too");
  fs::create_directory(f.dir / "texts");
  ef::test::write_text(f.dir / "texts" / "a.txt", "no weights here");
  const auto before = snapshot(f.dir.path());
  auto r = fuse(f, write_job(f, "notes", R"(, "replace": true)"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "the destination holds 'drafts', which is not a regular file: only a checkpoint "
                 "folder (regular files, no subfolders or links) is ever replaced"));
  r = fuse(f, write_job(f, "texts", R"(, "replace": true)"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "the destination folder holds no *.safetensors file: it is not a checkpoint"));
  // Without "replace" the message names the job key, not a C++ field.
  r = fuse(f, write_job(f, "texts"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "the destination folder exists and is not empty (set \"replace\": true in the "
                 "job to replace it atomically)"));
  auto now = snapshot(f.dir.path());
  now.erase("job.json");
  auto want = before;
  want.erase("job.json");
  CHECK(now == want);
  // An earlier output is a checkpoint folder: replaced, its config.json kept.
  REQUIRE(fuse(f, write_job(f, "fused")).rc == 0);
  CHECK(fuse(f, write_job(f, "fused", R"(, "replace": true)")).rc == 0);
  CHECK(fs::exists(f.dir / "fused" / "config.json"));
}

TEST_CASE(
    "adversarial paths: extract never overwrites an input or an existing file without --replace") {
  Fixture f;
  const std::string shard = f.ckpt.shards().front().path().string();
  const auto before = snapshot(f.dir.path());
  auto extract = [&](const std::string& out, bool replace) {
    std::vector<std::string> args = {"extract",
                                     "--schema",
                                     "llama",
                                     "--target",
                                     (f.dir / "target").string(),
                                     "--plan",
                                     (f.dir / "a.plan.json").string(),
                                     "--out",
                                     out};
    if (replace) args.push_back("--replace");
    return ef::test::cli(f.dir, args);
  };
  auto r = extract(shard, true);
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "the output lies inside the target ("));
  // A hard link to a shard is the shard.
  fs::create_hard_link(shard, f.dir / "linked.safetensors");
  r = extract((f.dir / "linked.safetensors").string(), true);
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "the output is the target ("));
  fs::remove(f.dir / "linked.safetensors");
  CHECK(snapshot(f.dir.path()) == before);
  // An existing file needs --replace, and then only a safetensors file is replaced.
  ef::test::write_text(f.dir / "mine.safetensors", "not a checkpoint");
  r = extract((f.dir / "mine.safetensors").string(), false);
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "the output exists (pass --replace to replace it)"));
  r = extract((f.dir / "mine.safetensors").string(), true);
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "the output exists and is not a file this command writes; it is never replaced"));
  CHECK(ef::test::read_text(f.dir / "mine.safetensors") == "not a checkpoint");
  REQUIRE(extract((f.dir / "sub.safetensors").string(), false).rc == 0);
  CHECK(extract((f.dir / "sub.safetensors").string(), false).rc == 2);
  CHECK(extract((f.dir / "sub.safetensors").string(), true).rc == 0);
}

TEST_CASE(
    "adversarial reports: a report path that is an input, a link or a stranger's file is refused "
    "before any work") {
  Fixture f;
  const fs::path shard = f.ckpt.shards().front().path();
  ef::test::write_text(f.dir / "victim.txt", "precious");
  fs::create_symlink("victim.txt", f.dir / "report-link.json");
  const auto before = snapshot(f.dir.path());
  struct Case {
    std::string report, why;
  };
  const std::vector<Case> cases = {
      {shard.string(), "the report lies inside the target ("},
      {"a.update/model.safetensors", "the report lies inside the update of client 'a' ("},
      {"a.plan.json", "the report is the plan of client 'a' ("},
      {"job.json", "the report is the job file ("},
      {"report-link.json", "the report is a symbolic link; it is never written through"},
      {"victim.txt",
       "the report exists and is not a file this command writes; it is never replaced"},
      {"fused", "the report is the output; choose another path"},
      {"missing/r.json", "the report: the folder '"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.report);
    const auto r = fuse(f, write_job(f, "fused", R"(, "report": ")" + c.report + "\""));
    CAPTURE(r.err);
    CHECK(r.rc == 2);
    CHECK(contains(r.err, c.why));
    CHECK_FALSE(fs::exists(f.dir / "fused"));  // nothing published
    auto now = snapshot(f.dir.path());
    now.erase("job.json");
    CHECK(now == before);
  }
  // A link planted at the name a temporary report would take is neither followed nor
  // truncated: temporaries are made under fresh names with O_EXCL | O_NOFOLLOW.
  fs::create_symlink("victim.txt", f.dir / ".fused.report.json.tmp");
  REQUIRE(fuse(f, write_job(f, "fused")).rc == 0);
  CHECK(ef::test::read_text(f.dir / "victim.txt") == "precious");
  // The report inside the output, committed with it, equals the one beside it.
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(contains(report, "\"accepted\""));
  CHECK(ef::test::read_text(f.dir / "fused" / ef::kReportInOutput) == report);
  CHECK(ef::is_fusion_report(f.dir / "fused.report.json"));
  // A report inside an existing output is refused.
  const auto r = fuse(f, write_job(f, "fused", R"(, "replace": true, "report": "fused/r.json")"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "the report lies inside the output ("));
}

TEST_CASE(
    "adversarial reports: a report that cannot be written fails the job before the output is "
    "published") {
  Fixture f;
  fs::create_directory(f.dir / "ro");
  const fs::path job = write_job(f, "fused", R"(, "report": "ro/r.json")");
  fs::permissions(f.dir / "ro", fs::perms::owner_read | fs::perms::owner_exec |
                                    fs::perms::group_read | fs::perms::group_exec |
                                    fs::perms::others_read | fs::perms::others_exec);
  // root ignores folder permissions: run the job as nobody then, in a folder nobody may write.
  std::vector<std::string> args = {EDGEFUSE_CLI, "fuse", job.string(), "--quiet"};
  if (::geteuid() == 0) {
    args.insert(args.begin(),
                {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"});
    fs::permissions(f.dir.path(), fs::perms::all);
  }
  const auto r = ef::test::run_program(f.dir, args);
  fs::permissions(f.dir / "ro", fs::perms::owner_all, fs::perm_options::add);
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "r.json: cannot create its temporary file: Permission denied"));
  CHECK_FALSE(fs::exists(f.dir / "fused"));
}

TEST_CASE(
    "adversarial links: a hard link, a symbolic link or another spelling of an update is one "
    "client") {
  Fixture f;
  fs::create_hard_link(f.dir / "a.update" / "model.safetensors", f.dir / "a-hard.safetensors");
  fs::create_directory_symlink("a.update", f.dir / "a-link");
  const std::string clients =
      kUpdates + R"(, {"name": "a2", "update": "a-hard.safetensors", "plan": "a.plan.json"},
                    {"name": "a3", "update": "a-link", "plan": "a.plan.json"},
                    {"name": "a4", "update": "./a.update/", "plan": "a.plan.json"})";
  const ef::FusionReport rep =
      ef::run_fusion(ef::parse_fusion_job(write_job(f, "fused", "", clients)));
  CHECK(rep.accepted == std::vector<std::string>{"a", "b"});
  REQUIRE(rep.rejected.size() == 3);
  for (const auto& x : rep.rejected) {
    CAPTURE(x.name);
    CHECK(x.reason.rfind("the same update as client 'a' (", 0) == 0);
  }
}

TEST_CASE("adversarial names: clients without a name are named by their path, none is lost") {
  Fixture f;
  // Absolute paths in a job read from a relative path: each client keeps its own name.
  const std::string a = (f.dir / "a.update").string(), b = (f.dir / "b.update").string();
  const std::string clients = R"({"update": ")" + a + R"(", "plan": "a.plan.json", "weight": 2},
                                 {"update": ")" +
                              b + R"(", "plan": "b.plan.json", "weight": 3})";
  write_job(f, "fused", R"(, "mode": "params")", clients);
  const ef::FusionReport rep = ef::run_fusion(ef::parse_fusion_job(f.dir / "job.json"));
  CHECK(rep.accepted == std::vector<std::string>{a, b});
  CHECK(rep.rejected.empty());
  // edgefuse aggregate fuses the same job to the same bytes.
  ef::test::write_text(f.dir / "agg.json",
                       R"({"target": "target", "schema": "llama", "output": "agg",
      "mode": "params", "clients": [)" +
                           clients + "]}");
  REQUIRE(ef::test::cli(f.dir, {"aggregate", (f.dir / "agg.json").string()}).rc == 0);
  CHECK(bytes_of(f.dir / "agg") == bytes_of(f.dir / "fused"));
}

namespace {

// The fixture's layout with two full-model f32 updates whose values `fill` gives.
struct FullUpdates {
  std::vector<std::vector<ef::NamedTensor>> updates;
  FullUpdates(const Fixture& f, float (*fill)(int client, std::size_t tensor, std::size_t i)) {
    const ef::Plan all = ef::parse_plan("{}", f.layout, "all");
    for (int c = 0; c < 2; ++c) {
      auto local = ef::extract(ef::views_of(f.ckpt), f.layout, all, ef::DType::kF32);
      for (std::size_t t = 0; t < local.size(); ++t) {
        float* x = local[t].tensor.view().data_as<float>();
        for (std::size_t i = 0; i < local[t].tensor.numel(); ++i) x[i] = fill(c, t, i);
      }
      updates.push_back(std::move(local));
    }
  }
  std::vector<ef::NamedTensor> fuse(const Fixture& f, ef::AggregateMode mode, float lr, float w0,
                                    float w1) const {
    ef::AggregateOptions opt;
    opt.mode = mode;
    opt.server_lr = lr;
    ef::Aggregator agg(f.layout, opt);
    const ef::Plan all = ef::parse_plan("{}", f.layout, "all");
    agg.add(ef::views_of(updates[0]), all, w0, "u0");
    agg.add(ef::views_of(updates[1]), all, w1, "u1");
    return agg.finalize(ef::views_of(f.ckpt));
  }
};

std::uint16_t bits_at(const std::vector<ef::NamedTensor>& out, std::size_t t, std::size_t i) {
  return out[t].tensor.view().data_as<ef::BFloat16>()[i].bits;
}

}  // namespace

TEST_CASE(
    "adversarial overflow: finite inputs whose f32 sums overflow give the finite mean, other "
    "elements keep their bits") {
  Fixture f;
  // Element 5 of tensor 1 is 3e38 in both clients (weights 2 and 3: the f32 sum overflows, the
  // mean 3e38 fits); in the reference round it is 1.
  const FullUpdates big(f, [](int c, std::size_t t, std::size_t i) {
    return t == 1 && i == 5
               ? 3e38f
               : 0.01f * static_cast<float>((i * 7 + static_cast<std::size_t>(c) * 3) % 13);
  });
  const FullUpdates plain(f, [](int c, std::size_t t, std::size_t i) {
    return t == 1 && i == 5
               ? 1.0f
               : 0.01f * static_cast<float>((i * 7 + static_cast<std::size_t>(c) * 3) % 13);
  });
  for (ef::AggregateMode mode : {ef::AggregateMode::kParams, ef::AggregateMode::kDelta}) {
    const auto got = big.fuse(f, mode, 1.0f, 2.0f, 3.0f);
    const auto ref = plain.fuse(f, mode, 1.0f, 2.0f, 3.0f);
    const float base = ef::to_f32(f.ckpt.view(got[1].name).data_as<ef::BFloat16>()[5]);
    const float want = mode == ef::AggregateMode::kParams ? 3e38f : static_cast<float>(3e38 + base);
    CHECK(bits_at(got, 1, 5) == ef::to_bf16(want).bits);
    for (std::size_t t = 0; t < got.size(); ++t) {
      for (std::size_t i = 0; i < got[t].tensor.numel(); ++i) {
        if (t == 1 && i == 5) continue;
        if (bits_at(got, t, i) != bits_at(ref, t, i))
          FAIL_CHECK("tensor " << t << " element " << i);
      }
    }
  }
  // Weight 1e12 x delta 1e30: the product overflows f32, the mean 1e30 does not.
  const FullUpdates huge(f, [](int, std::size_t, std::size_t) { return 1e30f; });
  const auto got = huge.fuse(f, ef::AggregateMode::kDelta, 1.0f, 1e12f, 1e12f);
  for (std::size_t i = 0; i < got[0].tensor.numel(); ++i) {
    const float base = ef::to_f32(f.ckpt.view(got[0].name).data_as<ef::BFloat16>()[i]);
    if (bits_at(got, 0, i) != ef::to_bf16(static_cast<float>(1e30 + base)).bits)
      FAIL_CHECK("element " << i);
  }
}

TEST_CASE(
    "adversarial overflow: a result outside the output dtype is an error naming the tensor and "
    "element") {
  Fixture f;
  const FullUpdates one_big(
      f, [](int, std::size_t t, std::size_t i) { return t == 2 && i == 33 ? 1e5f : 0.5f; });
  const std::string name = f.layout.tensors()[2].meta.name;
  const std::size_t cols = static_cast<std::size_t>(f.layout.tensors()[2].meta.shape[1]);
  // server_lr 1e34 x delta 1e5: 1e39 does not fit bf16 (nor f32).
  std::string err = edgefuse_test::error_of(
      [&] { one_big.fuse(f, ef::AggregateMode::kDelta, 1e34f, 1.0f, 1.0f); });
  CHECK(err.rfind("aggregate: tensor '" + name + "' element [" + std::to_string(33 / cols) + ", " +
                      std::to_string(33 % cols) +
                      "]: the fused value 1e+39 is not representable in BF16 "
                      "(the target's ",
                  0) == 0);
  CHECK(contains(err, " + server_lr 1e+34 x the weighted mean delta 100000)"));
  // A mean of 3.397e38 fits f32 but not bf16.
  const FullUpdates past_bf16(
      f, [](int, std::size_t t, std::size_t i) { return t == 2 && i == 33 ? 3.397e38f : 0.5f; });
  err = edgefuse_test::error_of(
      [&] { past_bf16.fuse(f, ef::AggregateMode::kParams, 1.0f, 1.0f, 1.0f); });
  CHECK(contains(err, "' element [" + std::to_string(33 / cols) + ", " + std::to_string(33 % cols) +
                          "]: the fused value 3.397e+38 is not representable in BF16 (the weighted "
                          "mean of its clients' values)"));
}

TEST_CASE(
    "adversarial overflow: LoRA factors of 1e20 fail fuse and merge-lora naming the element, "
    "nothing written") {
  Fixture f;
  // A rank-2 adapter on the target's own q_proj (32 x 32) whose B.A is 2e40 everywhere.
  const std::uint64_t n = 32;
  ef::test::save_rank2_lora(f.dir / "big.lora", "model.layers.0.self_attn.q_proj",
                            std::vector<float>(2 * n, 1e20f), std::vector<float>(n * 2, 1e20f), n,
                            n, 2.0);
  const auto before = snapshot(f.dir.path());
  auto r = fuse(f, write_job(f, "fused", "", R"({"name": "big", "adapter": "big.lora"})"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "error: aggregate: tensor 'model.layers.0.self_attn.q_proj.weight' element ["));
  CHECK(contains(r.err,
                 "the weighted sum of its clients' values is not finite in F32 even with the "
                 "weights scaled down"));
  CHECK_FALSE(fs::exists(f.dir / "fused"));
  r = ef::test::cli(f.dir, {"merge-lora", "--base", (f.dir / "target").string(), "--adapter",
                            (f.dir / "big.lora").string(), "--out", (f.dir / "merged").string()});
  CHECK(r.rc == 2);
  CHECK(contains(r.err,
                 "error: merge_lora: 'model.layers.0.self_attn.q_proj' weight element [0, 0]: "
                 "the merged value is not representable in BF16 (the update scale x (B.A) there "
                 "is 2e+40)"));
  CHECK_FALSE(fs::exists(f.dir / "merged"));
  auto now = snapshot(f.dir.path());
  now.erase("job.json");
  auto want = before;
  want.erase("job.json");
  CHECK(now == want);
}

TEST_CASE(
    "adversarial adapters: a backtracking rank_pattern is matched in linear time, bad ones "
    "refused") {
  Fixture f;
  const std::string module = "model.layers.0." + std::string(40, 'x');
  auto config_with = [&](const std::string& patterns) {
    return R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": )" +
           patterns + "}";
  };
  // "(x+x+)+y" against 40 x: a backtracking matcher takes 2^40 steps; RE2 a few hundred.
  const ef::LoraConfig c =
      ef::parse_lora_config(config_with(R"({"(x+x+)+y": 2})"), "adapter_config.json");
  CHECK(c.rank_for(module) == 4);
  CHECK(c.rank_for(module + "y") == 2);
  // PEFT's anchoring: the key matches a whole dotted suffix of the module name.
  const ef::LoraConfig d = ef::parse_lora_config(
      config_with(R"({"q_proj": 8, "layers\\.1\\..*": 6})"), "adapter_config.json");
  CHECK(d.rank_for("model.layers.0.self_attn.q_proj") == 8);
  CHECK(d.rank_for("model.layers.0.self_attn.xq_proj") == 4);
  CHECK(d.rank_for("model.layers.1.mlp.up_proj") == 6);
  // Backreferences and lookaround have no linear-time matcher; overlong keys are capped.
  std::string err = edgefuse_test::error_of(
      [&] { ef::parse_lora_config(config_with(R"({"(a)\\1": 2})"), "adapter_config.json"); });
  CAPTURE(err);
  CHECK(err.rfind(
            "adapter_config.json: rank_pattern key '(a)\\\\1' is not a regular expression edgefuse "
            "can match in linear time (RE2 syntax, no backreferences or lookaround): ",
            0) == 0);
  err = edgefuse_test::error_of([&] {
    ef::parse_lora_config(config_with("{\"" + std::string(2000, 'a') + "\": 2}"),
                          "adapter_config.json");
  });
  CHECK(contains(err, "' is 2000 bytes long, above the cap of 1024 (InvalidAdapter)"));
}

TEST_CASE(
    "adversarial limits: a file-size limit fails fuse with File too large, the staging folder kept "
    "and resumed") {
  Fixture f;
  const fs::path job = write_job(f, "fused");
  // The shell's ulimit -f is in 1024-byte blocks: 8 KiB, less than the first shard.
  const auto r = ef::test::run_program(f.dir, {"/bin/bash", "-c",
                                               std::string("ulimit -f 8; exec ") + EDGEFUSE_CLI +
                                                   " fuse " + job.string() + " --quiet"});
  CHECK(r.rc == 2);  // not killed by SIGXFSZ
  CHECK(contains(
      r.err,
      "/.fused.staging-resume/model.safetensors: write failed: File too large (errno 27) (Io)"));
  CHECK_FALSE(fs::exists(f.dir / "fused"));
  CHECK(fs::exists(f.dir / ".fused.staging-resume" / "edgefuse-resume.journal"));
  const auto again = fuse(f, job);
  REQUIRE(again.rc == 0);
  CHECK_FALSE(fs::exists(f.dir / ".fused.staging-resume"));
  // The same bytes as a run that never hit the limit.
  const std::string got = bytes_of(f.dir / "fused");
  REQUIRE(fuse(f, write_job(f, "fresh")).rc == 0);
  CHECK(got == bytes_of(f.dir / "fresh"));
}

TEST_CASE(
    "adversarial limits: simulate checks its budget as it builds clients, and a small address "
    "space is an error") {
  ef::test::ScratchDir dir;
  auto r = ef::test::cli(dir, {"simulate", "--target-params", "1e6", "--client-params", "1e5",
                               "--clients", "1000000", "--memory-budget", "64MiB", "--quiet"});
  CHECK(r.rc == 2);
  CHECK(r.err.rfind("error: memory budget: after ", 0) == 0);
  CHECK(contains(r.err, " of 1000000 clients their plans and row lists need "));
  CHECK(contains(r.err, "raise --memory-budget or simulate fewer clients"));
  // Under a 3 GB address space the default 2 GiB budget fails with the budget's message, not
  // with std::bad_alloc.
  r = ef::test::run_program(dir, {"/bin/bash", "-c",
                                  std::string("ulimit -v 3000000; exec ") + EDGEFUSE_CLI +
                                      " simulate --target-params 1e6 --client-params 1e5 "
                                      "--clients 200000 --threads 2 --quiet"});
  CHECK(r.rc == 2);
  CHECK(r.err.rfind("error: memory budget: after ", 0) == 0);
}

TEST_CASE(
    "adversarial messages: weights that vanish in f32, hexadecimal budgets, unknown schemas, long "
    "names") {
  Fixture f;
  const std::string tiny =
      R"({"name": "a", "update": "a.update", "plan": "a.plan.json", "weight": 1e-50},
                              {"name": "b", "update": "b.update", "plan": "b.plan.json"})";
  const ef::FusionReport rep =
      ef::run_fusion(ef::parse_fusion_job(write_job(f, "fused", "", tiny)));
  REQUIRE(rep.rejected.size() == 1);
  CHECK(rep.rejected[0].reason == "weight 1e-50 must be in [1e-12, 1e12]");
  auto r = fuse(f, write_job(f, "fused2", R"(, "memory_budget": "0x10GiB")"));
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "\"memory_budget\": memory size '0x10GiB': unknown unit 'x10GiB'"));
  ef::test::write_text(f.dir / "bert.json", R"({"target": "target", "schema": "bert", "output": "o",
      "clients": [{"update": "a.update", "plan": "a.plan.json"}]})");
  r = ef::test::cli(f.dir, {"fuse", (f.dir / "bert.json").string(), "--quiet"});
  CHECK(r.rc == 2);
  CHECK(
      contains(r.err, "/bert' is neither a preset (llama, gpt2, mlp) nor an existing schema file"));
  // A 4000-character axis name: the error line stays short.
  const std::string plan =
      "{\"" + std::string(4000, 'x') + R"(": {"policy": "heterofl", "rate": 0.5}})";
  ef::test::write_text(f.dir / "long.plan.json", plan);
  r = ef::test::cli(f.dir, {"plan", "--schema", "llama", "--target", (f.dir / "target").string(),
                            "--plan", (f.dir / "long.plan.json").string()});
  CHECK(r.rc == 2);
  CAPTURE(r.err);
  CHECK(r.err.size() < 1100);
  CHECK(r.err.rfind("error: ", 0) == 0);
}

TEST_CASE(
    "adversarial inputs that already held: malformed jobs, a shard path that leaves its folder, a "
    "busy output") {
  Fixture f;
  ef::test::write_text(f.dir / "bad.json", R"({"target": "target", "target": "x"})");
  auto r = ef::test::cli(f.dir, {"fuse", (f.dir / "bad.json").string()});
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "bad.json"));
  CHECK(contains(r.err, "JSON key 'target' appears twice in one object"));
  ef::test::write_text(f.dir / "bad.json", R"({"target": "target",)");
  r = ef::test::cli(f.dir, {"fuse", (f.dir / "bad.json").string()});
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "bad.json"));
  // An index naming a shard outside its folder.
  fs::create_directory(f.dir / "evil");
  ef::test::write_text(
      f.dir / "evil" / "model.safetensors.index.json",
      R"({"metadata": {}, "weight_map": {"w": "../target/model-00001-of-00003.safetensors"}})");
  r = ef::test::cli(f.dir, {"inspect", (f.dir / "evil").string()});
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "(ShardPathEscapes)"));
}

#endif  // EDGEFUSE_CLI
