// The fusion engine (engine/fuse.h) and `edgefuse fuse`: sub-model updates equal the
// Aggregator, a LoRA client alone equals merging its lifted adapter, mixed jobs give the same
// bytes for any client order, thread count and memory budget, bad clients are rejected with
// their reasons, a job with no valid client leaves the output untouched, and a run SIGKILLed
// at random instants and started again resumes to the same bytes.
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <unistd.h>

#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <set>
#include <csignal>
#include <cstring>
#include <thread>

#include "edgefuse/core/parallel.h"
#include "edgefuse/engine/fuse.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/io/peft.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/federated.h"
#include "tests/cli_helpers.h"
#include "tests/fuse_fixture.h"
#include "tests/error_of.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

#if defined(EDGEFUSE_CLI)

namespace {

using ef::test::bytes_of;
using ef::test::entries;
using ef::test::Fixture;
using ef::test::job_to;
using ef::test::kConfig;
using ef::test::kLora;
using ef::test::kPlanA;
using ef::test::kPlanB;
using ef::test::kUpdates;
using ef::test::same_checkpoints;
using ef::test::write_target;

}  // namespace

TEST_CASE("fuse: sub-model updates equal the Aggregator bit for bit, with a report") {
  Fixture f;
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates)));
  CHECK(r.accepted == std::vector<std::string>{"a", "b"});
  CHECK(r.rejected.empty());
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server_lr = 0.5f;
  ef::Aggregator agg(f.layout, opt);
  agg.add(ef::views_of(f.updates[0]), ef::parse_plan(kPlanA, f.layout, "p"), 2.0f, "a");
  agg.add(ef::views_of(f.updates[1]), ef::parse_plan(kPlanB, f.layout, "p"), 3.0f, "b");
  CHECK(
      same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), agg.finalize(ef::views_of(f.ckpt))));
  CHECK(fs::exists(f.dir / "fused" / "config.json"));
  CHECK(r.bytes_written == f.ckpt.total_bytes());
  CHECK(r.bytes_read > f.ckpt.total_bytes());
  CHECK(r.triad_bytes_per_second > 0);
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(report.find("\"accepted\": [\n    \"a\",\n    \"b\"\n  ]") != std::string::npos);
  CHECK(report.find("\"name\": \"model.layers.0.mlp.down_proj.weight\"") != std::string::npos);
  CHECK(report.find("\"triad_fraction\"") != std::string::npos);
}

TEST_CASE("fuse: a LoRA client alone equals merging its lifted adapter") {
  Fixture f;
  const fs::path job =
      f.job(R"({"name": "c", "adapter": "c.lora", "plan": "a.plan.json", "weight": 1})");
  // server_lr 0.5 halves the delta: merge the lifted adapter with factor 0.5.
  ef::run_fusion(ef::parse_fusion_job(job));
  const ef::LoraAdapter lifted = ef::lift_adapter(ef::load_lora_adapter(f.dir / "c.lora"), f.layout,
                                                  ef::parse_plan(kPlanA, f.layout, "p"));
  auto want = ef::extract(ef::views_of(f.ckpt), f.layout, ef::Plan{});
  for (auto& t : want) {
    if (t.name == lifted.modules[0].weight_name())
      ef::merge_lora(t.tensor.view(), lifted.modules[0], 0.5);
  }
  CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), want));
}

TEST_CASE("fuse: the same bytes for any client order, thread count and memory budget") {
  Fixture f;
  ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates + "," + kLora, R"(, "threads": 1)")));
  const std::string want = bytes_of(f.dir / "fused");
  ef::run_fusion(ef::parse_fusion_job(f.job(kLora + "," + kUpdates, R"(, "threads": 2)")));
  CHECK(bytes_of(f.dir / "fused") == want);
  // 16 MiB + a few KiB: tiles of a few hundred elements.
  const ef::FusionReport small = ef::run_fusion(ef::parse_fusion_job(
      f.job(kUpdates + "," + kLora, R"(, "threads": 3, "memory_budget": 17000000)")));
  CHECK(small.tile_elements < 4096);
  CHECK(bytes_of(f.dir / "fused") == want);
  ef::set_num_threads(0);
}

TEST_CASE("fuse with \"aggregation\": median and trimmed mean equal the Aggregator's") {
  Fixture f;
  const ef::Plan plan_a = ef::parse_plan(kPlanA, f.layout, "p");
  const ef::Plan plan_b = ef::parse_plan(kPlanB, f.layout, "p");
  for (const auto& [json, rule] :
       {std::pair{std::string(R"("median")"), ef::RobustAggregate{ef::RobustRule::kMedian, 0.0}},
        std::pair{std::string(R"({"rule": "trimmed_mean", "beta": 0.3})"),
                  ef::RobustAggregate{ef::RobustRule::kTrimmedMean, 0.3}}}) {
    CAPTURE(json);
    const ef::FusionReport r =
        ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates, R"(, "aggregation": )" + json)));
    REQUIRE(r.aggregation.robust);
    CHECK_FALSE(r.selection);
    ef::AggregateOptions opt;
    opt.mode = ef::AggregateMode::kDelta;
    opt.server_lr = 0.5f;
    opt.robust = rule;
    ef::Aggregator agg(f.layout, opt);
    agg.add(ef::views_of(f.updates[0]), plan_a, 2.0f, "a");
    agg.add(ef::views_of(f.updates[1]), plan_b, 3.0f, "b");
    const auto want = agg.finalize(ef::views_of(f.ckpt));
    CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), want));
    // Unweighted: the weighted mean of the same clients differs.
    ef::AggregateOptions mean = opt;
    mean.robust.reset();
    ef::Aggregator weighted(f.layout, mean);
    weighted.add(ef::views_of(f.updates[0]), plan_a, 2.0f, "a");
    weighted.add(ef::views_of(f.updates[1]), plan_b, 3.0f, "b");
    CHECK_FALSE(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"),
                                 weighted.finalize(ef::views_of(f.ckpt))));
  }
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(
      report.find("\"aggregation\": {\n    \"beta\": 0.3,\n    \"rule\": \"trimmed_mean\"\n  }") !=
      std::string::npos);

  // A LoRA client alone, weight 5: its median is its own delta, as merging its lifted adapter.
  ef::run_fusion(ef::parse_fusion_job(f.job(kLora, R"(, "aggregation": "median")")));
  const ef::LoraAdapter lifted =
      ef::lift_adapter(ef::load_lora_adapter(f.dir / "c.lora"), f.layout, plan_a);
  auto want = ef::extract(ef::views_of(f.ckpt), f.layout, ef::Plan{});
  for (auto& t : want) {
    if (t.name == lifted.modules[0].weight_name()) {
      ef::merge_lora(t.tensor.view(), lifted.modules[0], 0.5);
    }
  }
  CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), want));

  const std::string jf = (f.dir / "job.json").string();
  CHECK(edgefuse_test::error_of(
            [&] { ef::parse_fusion_job(f.job(kUpdates, R"(, "aggregation": "geomed")")); }) ==
        jf + ": \"aggregation\": unknown rule \"geomed\" (expected mean, median, trimmed_mean, "
             "krum, multi_krum, bulyan, centered_clip, ties, dare_linear or dare_ties)");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(kUpdates, R"(, "aggregation": {"rule": "median", "beta": 0.1})"));
        }) ==
        jf + ": \"aggregation\": unknown key 'beta' for rule median (expected rule, weighted)");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(kUpdates, R"(, "aggregation": {"rule": "trimmed_mean", "beta": 0.5})"));
        }) == jf + ": \"aggregation\": \"beta\" must be a number in [0, 0.5), got 0.5");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(f.job(kUpdates, R"(, "aggregation": 3)"));
        }) == jf + ": \"aggregation\" must be a rule name (mean, median, trimmed_mean, krum, "
                   "multi_krum, bulyan, centered_clip, ties, dare_linear or dare_ties) or an "
                   "object "
                   "{\"rule\": ..., ...}");
}

namespace {

// Writes <name>.update: the sub-model of `plan` with a delta pattern of its own, times scale.
void write_update(Fixture& f, const std::string& name, const char* plan, int seed, float scale) {
  auto local = ef::extract(ef::views_of(f.ckpt), f.layout, ef::parse_plan(plan, f.layout, "p"),
                           ef::DType::kF32);
  for (auto& t : local) {
    float* x = t.tensor.view().data_as<float>();
    for (std::size_t i = 0; i < t.tensor.numel(); ++i) {
      x[i] = scale *
             (0.01f * static_cast<float>((i * 5 + static_cast<std::size_t>(seed)) % 11) - 0.05f);
    }
  }
  ef::CheckpointWriter w(f.dir / (name + ".update"));
  for (const auto& t : local) w.add(t.name, t.tensor.view());
  w.commit();
  f.updates.push_back(std::move(local));
}

}  // namespace

TEST_CASE("fuse with \"aggregation\": multi_krum and bulyan equal the Aggregator's") {
  Fixture f;
  ef::test::write_text(f.dir / "full.plan.json", "{}");
  std::string clients = kUpdates;  // a and b, then d0 to d4 of the whole model; d4 is far off
  for (int i = 0; i < 5; ++i) {
    const std::string name = "d" + std::to_string(i);
    write_update(f, name, "{}", i, i == 4 ? 40.0f : 1.0f);
    clients += R"(, {"name": ")" + name + R"(", "update": ")" + name +
               R"(.update", "plan": "full.plan.json", "weight": )" + std::to_string(i + 1) + "}";
  }
  const std::vector<std::pair<const char*, float>> added{
      {kPlanA, 2.0f}, {kPlanB, 3.0f}, {"{}", 1.0f}, {"{}", 2.0f},
      {"{}", 3.0f},   {"{}", 4.0f},   {"{}", 5.0f}};
  const auto reference = [&](const ef::AggregateOptions& opt, const std::vector<int>& only) {
    ef::Aggregator agg(f.layout, opt);
    for (std::size_t c = 0; c < added.size(); ++c) {
      if (!only.empty() && std::find(only.begin(), only.end(), c) == only.end()) continue;
      agg.add(ef::views_of(f.updates[c]), ef::parse_plan(added[c].first, f.layout, "p"),
              added[c].second, "c");
    }
    return agg.finalize(ef::views_of(f.ckpt));
  };
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server_lr = 0.5f;

  // Multi-Krum, f = 1, m = 3, with the LoRA client c as an eighth: the fused result is the
  // weighted mean of the three selected, and d4 is left out.
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(
      f.job(clients + "," + kLora, R"(, "aggregation": {"rule": "multi_krum", "f": 1, "m": 3})")));
  REQUIRE(r.selection);
  REQUIRE(r.selection->clients.size() == 8);
  CHECK(r.selection->clients[6] == "d4");
  CHECK(r.selection->clients[7] == "c");
  CHECK_FALSE(r.selection->selected[6]);
  CHECK(std::isfinite(r.selection->scores[7]));
  std::vector<int> chosen;
  for (int c = 0; c < 7; ++c) {
    if (r.selection->selected[static_cast<std::size_t>(c)]) chosen.push_back(c);
  }
  REQUIRE(chosen.size() == 3);  // the selection here holds no LoRA client: c is not chosen
  CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), reference(opt, chosen)));
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(report.find(R"("name": "d4",)") != std::string::npos);
  CHECK(report.find(R"("rule": "multi_krum")") != std::string::npos);
  CHECK(report.find(R"("selected": false)") != std::string::npos);

  // Bulyan, f = 1, over the seven update clients: the Aggregator's with the same selection.
  const ef::FusionReport b = ef::run_fusion(
      ef::parse_fusion_job(f.job(clients, R"(, "aggregation": {"rule": "bulyan", "f": 1})")));
  REQUIRE(b.selection);
  CHECK(std::count(b.selection->selected.begin(), b.selection->selected.end(), true) == 5);
  CHECK_FALSE(b.selection->selected[6]);
  ef::AggregateOptions bulyan = opt;
  bulyan.selection = ef::ClientSelection{ef::SelectionRule::kBulyan, 1, 0};
  const auto want = reference(bulyan, {});
  CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), want));
  // "krum" is Multi-Krum with m = 1.
  const ef::FusionReport k = ef::run_fusion(
      ef::parse_fusion_job(f.job(clients, R"(, "aggregation": {"rule": "krum", "f": 2})")));
  REQUIRE(k.aggregation.selection);
  CHECK(k.aggregation.selection->m == 1);
  CHECK(std::count(k.selection->selected.begin(), k.selection->selected.end(), true) == 1);

  // f too large for the round: an error naming the numbers, the previous output untouched.
  const std::string before = bytes_of(f.dir / "fused");
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "bulyan", "f": 2})")));
        }) == "bulyan: f = 2 needs at least 4f + 3 = 11 clients; the round has 7");
  CHECK(bytes_of(f.dir / "fused") == before);
  const std::string jf = (f.dir / "job.json").string();
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "bulyan", "f": 1, "m": 2})"));
        }) == jf + ": \"aggregation\": unknown key 'm' for rule bulyan (expected rule, f)");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "multi_krum", "f": -1})"));
        }) == jf + ": \"aggregation\": \"f\" must be an integer in [0, 1000000], got -1");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "multi_krum", "m": 0})"));
        }) == jf + ": \"aggregation\": \"m\" must be an integer in [1, 1000000], got 0");
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "multi_krum", "f": 1, "m": 8})")));
        }) == "multi_krum: m = 8 must be in [1, 7] (the round's clients)");
}

TEST_CASE("fuse with \"aggregation\": centered_clip equals the Aggregator's, with a report") {
  Fixture f;
  ef::test::write_text(f.dir / "full.plan.json", "{}");
  std::string clients = kUpdates;  // a and b, then d0 to d2 of the whole model; d2 is far off
  for (int i = 0; i < 3; ++i) {
    const std::string name = "d" + std::to_string(i);
    write_update(f, name, "{}", i, i == 2 ? 40.0f : 1.0f);
    clients += R"(, {"name": ")" + name + R"(", "update": ")" + name +
               R"(.update", "plan": "full.plan.json", "weight": )" + std::to_string(i + 1) + "}";
  }
  const std::vector<std::pair<const char*, float>> added{
      {kPlanA, 2.0f}, {kPlanB, 3.0f}, {"{}", 1.0f}, {"{}", 2.0f}, {"{}", 3.0f}};
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server_lr = 0.5f;
  opt.centered_clip = ef::CenteredClipOptions{0.5, 2};
  ef::Aggregator agg(f.layout, opt);
  for (std::size_t c = 0; c < added.size(); ++c) {
    agg.add(ef::views_of(f.updates[c]), ef::parse_plan(added[c].first, f.layout, "p"),
            added[c].second, "c");
  }
  const auto want = agg.finalize(ef::views_of(f.ckpt));
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(f.job(
      clients, R"(, "aggregation": {"rule": "centered_clip", "tau": 0.5, "iterations": 2})")));
  CHECK(same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), want));
  REQUIRE(r.centered_clip);
  CHECK(r.centered_clip->labels == std::vector<std::string>{"a", "b", "d0", "d1", "d2"});
  CHECK(r.centered_clip->coefficients == agg.centered_clipping()->coefficients);
  CHECK(r.centered_clip->factors[4] < 0.1);
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(report.find(R"("rule": "centered_clip")") != std::string::npos);
  CHECK(report.find(R"("tau": 0.5)") != std::string::npos);
  CHECK(report.find(R"("coefficient": )") != std::string::npos);
  // With the LoRA client c as a sixth: its lifted update takes part in the Gram matrix.
  const ef::FusionReport l = ef::run_fusion(ef::parse_fusion_job(
      f.job(clients + "," + kLora, R"(, "aggregation": {"rule": "centered_clip", "tau": 0.5})")));
  REQUIRE(l.centered_clip);
  REQUIRE(l.centered_clip->labels.size() == 6);
  CHECK(l.centered_clip->labels[5] == "c");
  CHECK(l.centered_clip->coefficients[5] > 0.0);
  CHECK(l.centered_clip->distances[5] > 0.0);

  const std::string jf = (f.dir / "job.json").string();
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(f.job(clients, R"(, "aggregation": "centered_clip")"));
        }) == jf + ": \"aggregation\": centered_clip needs \"tau\", the clipping radius");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "centered_clip", "tau": 0})"));
        }) == jf + ": \"aggregation\": \"tau\" must be a finite number > 0, got 0");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(f.job(
              clients, R"(, "aggregation": {"rule": "centered_clip", "tau": 1, "iterations": 0})"));
        }) == jf + ": \"aggregation\": \"iterations\" must be an integer in [1, 1000000], got 0");
  CHECK(edgefuse_test::error_of([&] {
          ef::parse_fusion_job(
              f.job(clients, R"(, "aggregation": {"rule": "centered_clip", "tau": 1, "f": 1})"));
        }) == jf + ": \"aggregation\": unknown key 'f' for rule centered_clip (expected rule, tau, "
                   "iterations)");
  std::string params = ef::test::read_text(
      f.job(clients, R"(, "aggregation": {"rule": "centered_clip", "tau": 1})"));
  params.replace(params.find(R"("delta")"), 7, R"("params")");
  ef::test::write_text(f.dir / "job.json", params);
  CHECK(edgefuse_test::error_of([&] { ef::parse_fusion_job(f.dir / "job.json"); }) ==
        jf + ": \"aggregation\": centered_clip needs \"mode\": \"delta\" (it clips the clients' "
             "updates around the previous aggregate)");
}

TEST_CASE("fuse: bad clients are rejected with their reasons and the others fused") {
  Fixture f;
  {
    auto bad = ef::extract(ef::views_of(f.ckpt), f.layout, ef::parse_plan(kPlanA, f.layout, "p"));
    bad[0].tensor.view().data_as<ef::BFloat16>()[3].bits = 0x7FC0;
    ef::CheckpointWriter w(f.dir / "nan.update");
    for (const auto& t : bad) w.add(t.name, t.tensor.view());
    w.commit();
  }
  fs::copy(f.dir / "b.update", f.dir / "b2.update");
  fs::copy(f.dir / "b.update", f.dir / "b3.update");
  fs::copy(f.dir / "c.lora", f.dir / "c2.lora");
  const std::string clients = kUpdates + "," + kLora + R"(,
      {"name": "d-nan", "update": "nan.update", "plan": "a.plan.json"},
      {"name": "e-dup", "update": "a.update", "plan": "a.plan.json"},
      {"name": "a", "update": "b.update", "plan": "b.plan.json"},
      {"name": "f-zero", "update": "b.update", "plan": "a.plan.json", "weight": 0},
      {"name": "g-huge", "adapter": "c.lora", "weight": 1e30},
      {"name": "h-shape", "update": "b2.update", "plan": "a.plan.json"},
      {"name": "i-lora", "adapter": "c2.lora"},
      {"name": "j-missing", "update": "missing.update", "plan": "a.plan.json"},
      {"name": "k-plan", "update": "b3.update", "plan": "bad.plan.json"})";
  ef::test::write_text(f.dir / "bad.plan.json", R"({"hidden": [9999]})");
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(f.job(clients)));
  CHECK(r.accepted == std::vector<std::string>{"a", "b", "c"});
  std::map<std::string, std::string> why, kind;
  for (const auto& x : r.rejected) {
    why[x.name] = x.reason;
    kind[x.name] = ef::rejection_kind_name(x.kind);
  }
  REQUIRE(why.size() == 9);
  CHECK(kind == std::map<std::string, std::string>{{"a", "duplicate_name"},
                                                   {"d-nan", "bad_update"},
                                                   {"e-dup", "duplicate_file"},
                                                   {"f-zero", "weight"},
                                                   {"g-huge", "weight"},
                                                   {"h-shape", "bad_update"},
                                                   {"i-lora", "bad_update"},
                                                   {"j-missing", "unreadable"},
                                                   {"k-plan", "bad_plan"}});
  // The report says the same, with the kind.
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(report.find("\"kind\": \"duplicate_file\",\n      \"name\": \"e-dup\"") !=
        std::string::npos);
  CHECK(why["a"] == "duplicate client name 'a'");
  CHECK(why["d-nan"] == (f.dir / "nan.update").string() +
                            ": tensor 'model.embed_tokens.weight' holds a non-finite value at "
                            "element 3 (client rejected)");
  CHECK(why["e-dup"] == "the same update as client 'a' (" + (f.dir / "a.update").string() + ")");
  CHECK(why["f-zero"] == "weight 0 must be in [1e-12, 1e12]");
  CHECK(why["g-huge"] == "weight 1e+30 must be in [1e-12, 1e12]");
  CHECK(why["h-shape"].find((f.dir / "b2.update").string() + ": tensor ") == 0);
  // Without a plan the sub-model adapter does not fit the full-size target.
  CHECK(why["i-lora"].find("module 'model.layers.1.self_attn.q_proj' needs a weight of") == 0);
  // The accepted clients give what they give alone.
  const std::string with_bad = bytes_of(f.dir / "fused");
  ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates + "," + kLora)));
  CHECK(bytes_of(f.dir / "fused") == with_bad);
}

TEST_CASE("fuse: a DoRA adapter is rejected (a magnitude does not add into the coverage mean)") {
  Fixture f;
  {
    const ef::PeftAdapter peft = ef::PeftAdapter::open(f.dir / "c.lora");
    ef::WriteOptions wo;
    wo.file_stem = "adapter_model";
    ef::CheckpointWriter w(f.dir / "d.lora", wo);
    for (const auto& e : peft.checkpoint().tensors())
      w.add(e.info->name, peft.checkpoint().view(e.info->name));
    const auto& pair = peft.pairs().at(0);
    std::vector<float> mag(pair.out_features, 1.0f);
    w.add("base_model.model." + pair.module + ".lora_magnitude_vector.weight",
          ef::ConstTensorView(mag.data(), ef::DType::kF32, ef::Shape{pair.out_features}));
    w.add_file("adapter_config.json",
               R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true})");
    w.commit();
  }
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(
      f.job(kUpdates + R"(, {"name": "d", "adapter": "d.lora", "plan": "a.plan.json"})")));
  CHECK(r.accepted == std::vector<std::string>{"a", "b"});
  REQUIRE(r.rejected.size() == 1);
  CHECK(r.rejected[0].reason ==
        "adapter '" + (f.dir / "d.lora").string() +
            "': tensor "
            "'base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector.weight' "
            "is a DoRA magnitude; a DoRA adapter rescales whole rows and does not fuse "
            "as a delta (merge it with merge-lora)");
}

TEST_CASE("fuse: no valid client, bad jobs and an existing output leave the output untouched") {
  Fixture f;
  ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates)));
  const std::string before = bytes_of(f.dir / "fused");
  using edgefuse_test::error_of;
  CHECK(error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(
              f.job(R"({"name": "z", "update": "a.update", "plan": "b.plan.json"})")));
        }).find("no valid client contribution to fuse (1 rejected; first: z: ") == 0);
  CHECK(bytes_of(f.dir / "fused") == before);
  // Without "replace", an existing output is an error before anything is read.
  ef::test::write_text(f.dir / "job2.json",
                       R"({"target": "target", "schema": "llama", "output": "fused",
      "clients": [{"update": "a.update", "plan": "a.plan.json"}]})");
  CHECK(error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(f.dir / "job2.json"));
        }).find("fused") != std::string::npos);
  CHECK(bytes_of(f.dir / "fused") == before);
  // Job validation names the file and the key.
  const std::string jf = (f.dir / "job.json").string();
  CHECK(
      error_of([&] { ef::parse_fusion_job(f.job(kUpdates, R"(, "budget": 1)")); }) ==
      jf +
          ": unknown key 'budget' (expected target, schema, model_config, output, report, replace, "
          "mode, server_lr, server_optimizer, aggregation, clip, memory_budget, threads, clients)");
  CHECK(error_of([&] {
          ef::parse_fusion_job(f.job(kUpdates, R"(, "memory_budget": "2 parsecs")"));
        }) == jf + ": \"memory_budget\": memory size '2 parsecs': unknown unit 'parsecs'");
  CHECK(error_of([&] {
          ef::parse_fusion_job(f.job(R"({"update": "a.update", "adapter": "c.lora"})"));
        }) == jf + ": clients[0] needs exactly one of \"update\" (a sub-model update) and "
                   "\"adapter\" (a PEFT folder)");
  CHECK(error_of([&] { ef::parse_fusion_job(f.job(R"({"update": "a.update"})")); }) ==
        jf + ": clients[0]: an update needs a \"plan\"");
  CHECK(error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(f.job(kUpdates, R"(, "memory_budget": "1MiB")")));
        }).find("memory budget of 1048576 bytes is below the engine's minimum") == 0);
  CHECK(ef::parse_byte_size("2GiB") == (std::uint64_t{2} << 30));
  CHECK(ef::parse_byte_size("1.5GB") == 1500000000u);
  CHECK(ef::parse_byte_size("4096") == 4096u);
  CHECK(bytes_of(f.dir / "fused") == before);
}

TEST_CASE("edgefuse fuse: the table, the report and plain progress lines") {
  Fixture f;
  const auto r = ef::test::cli(f.dir, {"fuse", f.job(kUpdates + "," + kLora).string()});
  INFO(r.err);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("fused 3 clients (0 rejected) into ") != std::string::npos);
  CHECK(r.out.find("model.layers.1.self_attn.q_proj.weight") != std::string::npos);
  CHECK(r.err.find("progress 100%: tensors ") != std::string::npos);
  CHECK(fs::exists(f.dir / "fused.report.json"));
  const auto bad = ef::test::cli(f.dir, {"fuse", (f.dir / "missing.json").string()});
  CHECK(bad.rc == 2);
  CHECK(bad.err.find("error: ") == 0);
}

TEST_CASE("edgefuse fuse: SIGKILLed at random instants and started again, the same bytes") {
  // A 6.6M-parameter target in 4 MB shards and two sub-model updates: long enough that the
  // kills land while tensors are being written.
  const char* config =
      R"({"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
          "num_hidden_layers": 8, "intermediate_size": 688, "vocab_size": 2000, "tie_word_embeddings": true})";
  ef::test::ScratchDir dir;
  write_target(dir / "target", config, 4u << 20);
  const auto ckpt = ef::Checkpoint::open(dir / "target");
  const auto layout =
      ef::Schema::preset("llama", ef::parse_model_config(config, "c")).bind(ef::tensor_metas(ckpt));
  const std::string clients = ef::test::write_xor_updates(dir.path(), ckpt, layout, 3);
  const fs::path job = dir / "job.json";
  ef::test::write_text(
      job, R"({"target": "target", "schema": "llama", "output": "fused", "replace": true,
      "memory_budget": "64MiB", "clients": [)" +
               clients + "]}");
  const fs::path staging = dir / ".fused.staging-resume";
  auto journaled = [&] {
    std::error_code ec;
    if (!fs::exists(staging / "edgefuse-resume.journal", ec)) return std::size_t{0};
    const std::string text = ef::test::read_text(staging / "edgefuse-resume.journal");
    return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')) - 1;
  };

  const auto t0 = std::chrono::steady_clock::now();
  auto r = ef::test::cli(dir, {"fuse", job.string(), "--quiet"});
  const auto full = std::chrono::steady_clock::now() - t0;
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("resumed:") == std::string::npos);
  const std::string want = bytes_of(dir / "fused");
  std::mt19937_64 rng(5);
  // Kill instants up to 1.1x an uninterrupted run, growing 3% after each kill: on a loaded
  // machine (ctest runs tests in parallel) runs take longer than the one timed above, and
  // the test still needs runs that finish.
  const double full_us =
      static_cast<double>(std::chrono::duration_cast<std::chrono::microseconds>(full).count());
  double reach = 1.1;
  auto delay = [&] {
    return std::chrono::microseconds(
        static_cast<long long>(std::uniform_real_distribution<double>(0.0, full_us * reach)(rng)));
  };
  // Whether the process has ended (left to reap).
  auto ended = [](pid_t pid) {
    siginfo_t info{};
    return ::waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
  };
  int kills = 0, resumed_runs = 0;
  std::size_t left = 0;
  for (int run = 0; run < 200 && (kills < 15 || resumed_runs < 3); ++run) {
    // Alternate thread counts: a resumed run need not use the killed run's.
    const pid_t pid = ef::test::spawn(
        {EDGEFUSE_CLI, "fuse", job.string(), "--quiet", "--threads", run % 2 ? "1" : "2"},
        dir / "out.txt", dir / "err.txt");
    if (run % 3 == 2) {
      // Writing the tensors is a short part of a run (the triad measured at start-up and
      // reading the inputs come first), so kills at random instants seldom land in it: every
      // third run is killed 0-10 ms after its journal holds a tensor.
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (journaled() == 0 && !ended(pid) && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 10000));
    } else {
      std::this_thread::sleep_for(delay());
    }
    ::kill(pid, SIGKILL);
    const int rc = ef::test::reap(pid);
    if (rc == -SIGKILL) {
      ++kills;
      reach *= 1.03;
      left = journaled();
      continue;
    }
    INFO(ef::test::read_text(dir / "err.txt"));
    REQUIRE(rc == 0);
    const std::string out = ef::test::read_text(dir / "out.txt");
    const std::string expect =
        left > 0 ? "resumed: " + std::to_string(left) + " tensors (" : std::string("report: ");
    CHECK(out.find(expect) != std::string::npos);
    resumed_runs += left > 0;
    CHECK(bytes_of(dir / "fused") == want);
    const std::string report = ef::test::read_text(dir / "fused.report.json");
    CHECK(report.find("\"resumed_tensors\": " + std::to_string(left) + ",") != std::string::npos);
    // Coverage of kept tensors comes back from the journal: the same table as a full run.
    CHECK(out.substr(0, out.find("fused 2 clients")) ==
          r.out.substr(0, r.out.find("fused 2 clients")));
    left = 0;
  }
  MESSAGE("kills " << kills << ", resumed runs " << resumed_runs);
  CHECK(kills >= 15);
  CHECK(resumed_runs >= 3);

  // A changed input (a client file rewritten) is another job: nothing is kept.
  for (int attempt = 0; attempt < 100 && journaled() == 0; ++attempt) {
    const pid_t pid = ef::test::spawn({EDGEFUSE_CLI, "fuse", job.string(), "--quiet"});
    std::this_thread::sleep_for(delay());
    ::kill(pid, SIGKILL);
    ef::test::reap(pid);
  }
  REQUIRE(journaled() > 0);
  fs::last_write_time(dir / "a.plan.json",
                      fs::last_write_time(dir / "a.plan.json") + std::chrono::seconds(1));
  r = ef::test::cli(dir, {"fuse", job.string(), "--quiet"});
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("resumed:") == std::string::npos);
  CHECK(bytes_of(dir / "fused") == want);
}

TEST_CASE(
    "fuse: the clients' state counts against the memory budget, over it, nothing is written") {
  Fixture f;
  // Twenty-four adapter clients and the two updates.
  std::string clients = kUpdates;
  for (int i = 0; i < 24; ++i) {
    const std::string name = "c" + std::to_string(i) + ".lora";
    fs::copy(f.dir / "c.lora", f.dir / name, fs::copy_options::recursive);
    clients += R"(, {"adapter": ")" + name + R"(", "plan": "a.plan.json", "weight": )" +
               std::to_string(i + 1) + "}";
  }
  const ef::FusionReport big =
      ef::run_fusion(ef::parse_fusion_job(f.job(clients, R"(, "threads": 1)")));
  REQUIRE(big.accepted.size() == 26);
  const std::string want = bytes_of(f.dir / "fused");
  // Plans, index lists and file indexes of 26 clients, and the rank-2 factors of 24 adapters
  // for the one tensor they share, at most: tens of KiB at this size.
  const std::uint64_t state = big.client_state_bytes;
  CHECK(state > 24 * 4 * 2 * (32 + 32));
  CHECK(state < (std::uint64_t{1} << 20));
  const std::string report = ef::test::read_text(big.report_file);
  CHECK(report.find("\"client_state_bytes\": " + std::to_string(state)) != std::string::npos);
  // The budget holds 2 x 8 MiB of writer buffers, a quarter of the rest for tiles, and the
  // state: just above fixed + 4/3 state it runs (the same bytes). At the engine's minimum of
  // fixed + 48 KiB (12 KiB of tiles) the state does not fit.
  const std::uint64_t fixed = std::uint64_t{16} << 20;
  const ef::FusionReport fits = ef::run_fusion(
      ef::parse_fusion_job(f.job(clients, R"(, "threads": 1, "memory_budget": )" +
                                              std::to_string(fixed + state * 4 / 3 + 64))));
  CHECK(fits.client_state_bytes == state);
  CHECK(bytes_of(f.dir / "fused") == want);
  const auto listing = [&] {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(f.dir / ""))
      names.insert(e.path().filename().string());
    return names;
  };
  const auto files_before = listing();
  REQUIRE(state > 48 * 1024 - 12 * 1024);
  const std::uint64_t small = fixed + 48 * 1024;
  const std::string err = edgefuse_test::error_of([&] {
    ef::run_fusion(ef::parse_fusion_job(
        f.job(clients, R"(, "threads": 1, "memory_budget": )" + std::to_string(small))));
  });
  CHECK(err.find("memory budget: after ") == 0);
  CHECK(err.find(" of 26 clients (the last '") != std::string::npos);
  CHECK(err.find("exceeds the memory budget of " + std::to_string(small) +
                 " bytes; raise \"memory_budget\" or split the clients over several jobs. The "
                 "output was not written") != std::string::npos);
  CHECK(bytes_of(f.dir / "fused") == want);
  CHECK(listing() == files_before);
}

TEST_CASE("fuse: a second job on the same output fails fast and leaves it untouched") {
  Fixture f;
  const fs::path job = job_to(f, "fused");
  ef::run_fusion(ef::parse_fusion_job(job));
  const std::string before = bytes_of(f.dir / "fused");
  {
    ef::WriteOptions wo;
    wo.replace_existing = true;
    ef::CheckpointWriter first(f.dir / "fused", wo);  // the first job, still writing
    const auto r = ef::test::cli(f.dir, {"fuse", job.string()});
    CHECK(r.rc == 2);
    CHECK(r.err.find("error: " + (f.dir / "fused").string() +
                     ": another writer holds the lock "
                     ".fused.edgefuse-lock") == 0);
    CHECK(bytes_of(f.dir / "fused") == before);
  }
  // Once the first job is gone the same job runs.
  CHECK(ef::test::cli(f.dir, {"fuse", job.string()}).rc == 0);
  CHECK(bytes_of(f.dir / "fused") == before);
}

TEST_CASE("fuse: a read-only output folder is an error naming it, nothing changes") {
  Fixture f;
  fs::create_directory(f.dir / "ro");
  const fs::path job = job_to(f, "ro/fused");
  ef::run_fusion(ef::parse_fusion_job(job));
  const std::string before = bytes_of(f.dir / "ro" / "fused");
  const auto listing = entries(f.dir / "ro");
  fs::permissions(f.dir / "ro", fs::perms::owner_read | fs::perms::owner_exec |
                                    fs::perms::group_read | fs::perms::group_exec |
                                    fs::perms::others_read | fs::perms::others_exec);
  // root ignores folder permissions: run the job as nobody then.
  std::vector<std::string> args = {EDGEFUSE_CLI, "fuse", job.string()};
  if (::geteuid() == 0) {
    args.insert(args.begin(),
                {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"});
  }
  const auto r = ef::test::run_program(f.dir, args);
  fs::permissions(f.dir / "ro", fs::perms::owner_all, fs::perm_options::add);
  CHECK(r.rc == 2);
  // The report's temporary file, made in the same folder before any work, is the first thing
  // the job cannot create.
  CHECK(r.err.find("error: " + (f.dir / "ro" / "fused.report.json").string() +
                   ": cannot create its temporary file: Permission denied") == 0);
  CHECK(bytes_of(f.dir / "ro" / "fused") == before);
  CHECK(entries(f.dir / "ro") == listing);
}

TEST_CASE(
    "fuse: disk full (a size-limited file, a small tmpfs) fails, the output unchanged, the staging "
    "folder kept to resume") {
  Fixture f;
  const fs::path job = job_to(f, "fused");
  ef::run_fusion(ef::parse_fusion_job(job));
  const std::string before = bytes_of(f.dir / "fused");
  const auto listing = entries(f.dir.path());
  using edgefuse_test::error_of;
  {
    // RLIMIT_FSIZE: write() fails with EFBIG past 4 KiB, in the middle of the first shard.
    struct rlimit old {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    auto* prev = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = 4096;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
    const std::string err = error_of([&] { ef::run_fusion(ef::parse_fusion_job(job)); });
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, prev);
    CHECK(err == (f.dir / ".fused.staging-resume" / "model.safetensors").string() +
                     ": write failed: File too large (errno 27) (Io)");
    CHECK(bytes_of(f.dir / "fused") == before);
    // No report rewritten; the resumable staging folder is kept for the same job to resume.
    auto with_staging = listing;
    with_staging.push_back(".fused.staging-resume");
    std::sort(with_staging.begin(), with_staging.end());
    CHECK(entries(f.dir.path()) == with_staging);
    CHECK(fs::exists(f.dir / ".fused.staging-resume" / "edgefuse-resume.journal"));
    ef::run_fusion(ef::parse_fusion_job(job));
    CHECK(bytes_of(f.dir / "fused") == before);
    CHECK(entries(f.dir.path()) == listing);
  }
  // A tmpfs that holds the old output but not a second copy beside it: ENOSPC.
  fs::create_directory(f.dir / "small");
  if (::mount("tmpfs", (f.dir / "small").c_str(), "tmpfs", 0, "size=64k") != 0) {
    MESSAGE("tmpfs cannot be mounted here (" << std::strerror(errno)
                                             << "): only the size-limited file case ran");
    return;
  }
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{f.dir / "small"};
  const fs::path small_job = job_to(f, "small/fused");
  ef::run_fusion(ef::parse_fusion_job(small_job));
  const std::string small_before = bytes_of(f.dir / "small" / "fused");
  const auto small_listing = entries(f.dir / "small");
  const std::string err = error_of([&] { ef::run_fusion(ef::parse_fusion_job(small_job)); });
  CHECK(err == (f.dir / "small" / ".fused.staging-resume" / "model.safetensors").string() +
                   ": write failed: No space left on device (errno 28) (Io)");
  CHECK(bytes_of(f.dir / "small" / "fused") == small_before);
  auto with_staging = small_listing;
  with_staging.push_back(".fused.staging-resume");
  std::sort(with_staging.begin(), with_staging.end());
  CHECK(entries(f.dir / "small") == with_staging);
}

TEST_CASE("edgefuse simulate: shapes, a verified round, the same checksum for 1 and 2 threads") {
  ef::test::ScratchDir dir;
  const std::vector<std::string> args = {"simulate", "--target-params", "2e7", "--client-params",
                                         "1e6",      "--clients",       "12",  "--verify",
                                         "25",       "--quiet"};
  auto with = [&](std::vector<std::string> extra) {
    auto a = args;
    a.insert(a.end(), extra.begin(), extra.end());
    return ef::test::cli(dir, a);
  };
  const auto one = with({"--threads", "1"});
  INFO(one.err);
  REQUIRE(one.rc == 0);
  CHECK(one.out.find("target: Llama-shaped, ") == 0);
  CHECK(one.out.find("clients: 12 x ") != std::string::npos);
  CHECK(one.out.find("verify: 25 sampled rows equal the scalar reference bit for bit") !=
        std::string::npos);
  const auto at = one.out.find("checksum: xxh3-64 ");
  REQUIRE(at != std::string::npos);
  const std::string sum = one.out.substr(at, 34);
  const auto two = with({"--threads", "2", "--memory-budget", "3MiB"});
  REQUIRE(two.rc == 0);
  CHECK(two.out.find(sum) != std::string::npos);
  const auto dry = ef::test::cli(dir, {"simulate", "--target-params", "100e9", "--client-params",
                                       "100e6", "--clients", "1000", "--dry-run"});
  CHECK(dry.rc == 0);
  CHECK(dry.out ==
        "target: Llama-shaped, 100.00B params: hidden 9216, 92 layers, 72 heads (8 KV, head_dim "
        "128), "
        "MLP 32256, vocab 32000, 831 tensors, bf16\n"
        "clients: 1000 x 90.62M params: width 1/8 (hidden 1152, 1 KV heads, MLP 4032), 1 of 92 "
        "layers, "
        "rolling windows staggered across clients (round 0)\n");
  const auto bad = with({"--memory-budget", "1KiB", "--threads", "2"});
  CHECK(bad.rc == 2);
  CHECK(bad.err ==
        "error: memory budget of 1024 bytes is too small for a chunk of target rows and 2 tiles\n");
  // The job file's rules: a median with FedAdam (verify is the weighted mean's, so not here).
  const std::vector<std::string> rules = {"simulate",
                                          "--target-params",
                                          "2e7",
                                          "--client-params",
                                          "1e6",
                                          "--clients",
                                          "12",
                                          "--quiet",
                                          "--aggregation",
                                          "median",
                                          "--threads",
                                          "2",
                                          "--server-optimizer",
                                          R"({"rule": "fedadam", "lr": 0.01})"};
  const auto median = ef::test::cli(dir, rules);
  INFO(median.err);
  CHECK(median.rc == 0);
  CHECK(median.out.find("rules: aggregation median, server optimizer fedadam\n") !=
        std::string::npos);
  CHECK(median.out.find(sum) == std::string::npos);
  const auto krum = ef::test::cli(dir, {"simulate", "--target-params", "2e7", "--client-params",
                                        "1e6", "--clients", "12", "--aggregation", "multi_krum"});
  CHECK(krum.rc == 2);
  const std::string not_simulated =
      "error: --aggregation: simulate runs mean, median or trimmed_mean (a client selection, "
      "centered clipping or a task merge reads every client's values more than once; run it "
      "with edgefuse fuse)\n";
  CHECK(krum.err == not_simulated);
  const auto ties = ef::test::cli(dir, {"simulate", "--target-params", "2e7", "--client-params",
                                        "1e6", "--clients", "12", "--aggregation", "ties"});
  CHECK(ties.rc == 2);
  CHECK(ties.err == not_simulated);
  const auto cclip = ef::test::cli(
      dir, {"simulate", "--target-params", "2e7", "--client-params", "1e6", "--clients", "12",
            "--aggregation", R"({"rule": "centered_clip", "tau": 1})"});
  CHECK(cclip.rc == 2);
  CHECK(cclip.err == not_simulated);
  const auto bad_rule =
      ef::test::cli(dir, {"simulate", "--target-params", "2e7", "--client-params", "1e6",
                          "--clients", "12", "--server-optimizer", "adam"});
  CHECK(bad_rule.rc == 2);
  CHECK(bad_rule.err.find("--server-optimizer: \"server_optimizer\": unknown rule") !=
        std::string::npos);
}

namespace {

// Runs args inside the v1 memory cgroup `cg` (the shell joins it, then execs args[0]); returns
// the exit status (-signal when killed).
int run_in_cgroup(const fs::path& cg, const std::vector<std::string>& args, const fs::path& out,
                  const fs::path& err) {
  std::vector<std::string> sh = {"/bin/sh", "-c", "echo $$ > \"$0\" && exec \"$@\"",
                                 (cg / "cgroup.procs").string()};
  sh.insert(sh.end(), args.begin(), args.end());
  return ef::test::reap(ef::test::spawn(sh, out, err));
}

bool write_file(const fs::path& p, const std::string& text) {
  std::ofstream f(p);
  f << text;
  f.close();
  return static_cast<bool>(f);
}

}  // namespace

TEST_CASE("fuse: under a memory cgroup far smaller than the target, the job completes") {
  // A 214M-parameter bf16 target (428 MB) and four width-1/4 sub-model updates, fused with a
  // 64 MiB budget by `edgefuse fuse` inside a cgroup whose limit is the program's own resident
  // size plus the budget plus 64 MiB: well below the target's size, so neither the target nor
  // the output can be held in memory. It must finish with the bytes of an unconstrained run.
  const fs::path cgroot = "/sys/fs/cgroup/memory";
  const fs::path cg = cgroot / ("edgefuse-test-" + std::to_string(::getpid()));
  std::error_code ec;
  if (!fs::is_directory(cgroot) || !fs::create_directory(cg, ec) || ec) {
    MESSAGE("skipped: cannot create a v1 memory cgroup under " << cgroot.string());
    return;
  }
  struct Remove {
    fs::path p;
    ~Remove() { ::rmdir(p.c_str()); }
  } remove_cg{cg};

  ef::test::ScratchDir dir;
  const char* config =
      R"({"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
          "num_hidden_layers": 12, "intermediate_size": 4096, "vocab_size": 16000, "tie_word_embeddings": false})";
  const ef::ModelConfig mc = ef::parse_model_config(config, "config");
  std::uint64_t target_bytes = 0;
  {
    ef::CheckpointWriter w(dir / "big");
    std::uint64_t salt = 0;
    for (const auto& m : ef::llama_tensor_metas(mc, ef::DType::kBF16)) {
      target_bytes += m.shape.numel() * 2;
      ++salt;
      w.add(m.name, m.dtype, m.shape,
            [salt](std::uint64_t offset, std::byte* dst, std::size_t len) {
              for (std::size_t i = 0; i < len; ++i) {
                const std::uint64_t e = (offset + i) / 2;
                const std::uint32_t h =
                    static_cast<std::uint32_t>((e + salt * 1000003) * 2654435761u);
                // bf16 of magnitude ~[0.0078, 0.0156) with a random sign: high byte 0x3C or 0xBC.
                const std::uint16_t bits =
                    static_cast<std::uint16_t>(((h >> 31) << 15) | 0x3C00 | ((h >> 8) & 0x3FF));
                dst[i] = static_cast<std::byte>((offset + i) % 2 == 0 ? bits & 0xFF : bits >> 8);
              }
            });
    }
    w.add_file("config.json", config);
    w.commit();
  }
  REQUIRE(target_bytes > 400'000'000);
  const ef::Checkpoint target = ef::Checkpoint::open(dir / "big");
  const ef::ModelLayout layout = ef::Schema::preset("llama", mc).bind(ef::tensor_metas(target));
  std::string clients;
  for (int k = 0; k < 4; ++k) {
    const std::string plan =
        R"({"hidden": {"policy": "fedrolex", "rate": 0.25, "round": )" + std::to_string(k * 256) +
        R"(}, "heads": {"policy": "heterofl", "rate": 0.25}, "kv_heads": {"policy": "heterofl", "rate": 0.25}, "mlp": {"policy": "fedrolex", "rate": 0.25, "round": )" +
        std::to_string(k * 1024) + "}}";
    ef::test::write_text(dir / ("p" + std::to_string(k) + ".json"), plan);
    const auto local = ef::extract(ef::views_of(target), layout, ef::parse_plan(plan, layout, "p"),
                                   ef::DType::kBF16);
    ef::CheckpointWriter w(dir / ("u" + std::to_string(k) + ".update"));
    for (const auto& t : local) w.add(t.name, t.tensor.view());
    w.commit();
    clients += std::string(k ? ", " : "") + R"({"update": "u)" + std::to_string(k) +
               R"(.update", "plan": "p)" + std::to_string(k) + R"(.json", "weight": )" +
               std::to_string(k + 1) + "}";
  }
  auto job = [&](const std::string& output) {
    const fs::path p = dir / (output + ".json");
    ef::test::write_text(
        p, R"({"target": "big", "schema": "llama", "output": ")" + output +
               R"(", "mode": "delta", "memory_budget": "64MiB", "threads": 2, "clients": [)" +
               clients + "]}");
    return p;
  };
  ef::run_fusion(ef::parse_fusion_job(job("ref")));

  // The cgroup's peak charge (memory.max_usage_in_bytes: the program's anonymous memory and
  // the page cache it brings in) for the program alone, then the limit.
  auto peak = [&] { return std::stoull(ef::test::read_text(cg / "memory.max_usage_in_bytes")); };
  REQUIRE(run_in_cgroup(cg, {EDGEFUSE_CLI, "--help"}, dir / "o.txt", dir / "e.txt") == 0);
  const std::uint64_t idle = peak();
  const std::uint64_t limit = idle + (std::uint64_t{128} << 20);  // + the 64 MiB budget + 64 MiB
  CAPTURE(idle);
  REQUIRE(limit < target_bytes);
  if (!write_file(cg / "memory.limit_in_bytes", std::to_string(limit)) ||
      !write_file(cg / "memory.max_usage_in_bytes", "0")) {
    MESSAGE("skipped: cannot set the limits of " << cg.string());
    return;
  }
  const int rc = run_in_cgroup(cg, {EDGEFUSE_CLI, "fuse", "--quiet", job("fused").string()},
                               dir / "o.txt", dir / "e.txt");
  CAPTURE(ef::test::read_text(dir / "e.txt"));
  CHECK(rc == 0);  // not killed by the cgroup's OOM killer
  const std::uint64_t used = peak();
  CHECK(used <= limit);
  MESSAGE("cgroup limit " << limit / (1 << 20) << " MiB (the program alone " << idle / (1 << 20)
                          << " MiB), target and output " << target_bytes / (1 << 20)
                          << " MiB each, peak charge " << used / (1 << 20) << " MiB");
  // The control: the same limit kills a program that holds its target in memory (the
  // synthetic demo keeps a 56M-parameter target and its clients, about 0.8 GB) when there is
  // no swap to page it out to.
  const std::string swaps = ef::test::read_text("/proc/swaps");
  if (std::count(swaps.begin(), swaps.end(), '\n') <= 1) {
    CHECK(run_in_cgroup(cg, {EDGEFUSE_CLI, "demo"}, dir / "o.txt", dir / "e.txt") == -SIGKILL);
  } else {
    MESSAGE("the control run is skipped: swap is on");
  }
  const ef::Checkpoint a = ef::Checkpoint::open(dir / "ref"),
                       b = ef::Checkpoint::open(dir / "fused");
  REQUIRE(a.size() == b.size());
  for (const auto& e : a.tensors()) {
    const auto va = a.view(e.info->name), vb = b.view(e.info->name);
    CAPTURE(e.info->name);
    REQUIRE(va.nbytes() == vb.nbytes());
    CHECK(std::memcmp(va.bytes(), vb.bytes(), va.nbytes()) == 0);
  }
}

#endif  // EDGEFUSE_CLI
