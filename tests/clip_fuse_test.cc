// The engine's "clip" job key: fixed clipping with noise equals the Aggregator's round bit for
// bit and writes its state beside the model; adaptive clipping over rounds chained through
// that state moves the norm by C·exp(-lr·(b - quantile)); bad keys and a missing state are
// named before anything is written.
#include <cmath>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/clipping.h"
#include "edgefuse/engine/fuse.h"
#include "tests/error_of.h"
#include "tests/fuse_fixture.h"

#if defined(EDGEFUSE_CLI)
namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

using ef::test::Fixture;
using ef::test::kPlanA;
using ef::test::kPlanB;
using ef::test::kUpdates;
using ef::test::same_checkpoints;

// A delta job of the fixture's two updates from `target` to `output` with `clip`.
fs::path clip_job(const Fixture& f, const std::string& target, const std::string& output,
                  const std::string& clip, const std::string& mode = "delta") {
  const fs::path p = f.dir / ("job-" + output + ".json");
  ef::test::write_text(p, R"({"target": ")" + target + R"(", "schema": "llama", "output": ")" +
                              output + R"(", "replace": true, "mode": ")" + mode +
                              R"(", "server_lr": 0.5, "clip": )" + clip + R"(, "clients": [)" +
                              kUpdates + "]}");
  return p;
}

nlohmann::json state_of(const fs::path& folder) {
  return nlohmann::json::parse(ef::test::read_text(folder / "edgefuse_clip_state.json"));
}

}  // namespace

TEST_CASE("fuse with \"clip\": fixed clipping with noise equals the Aggregator's, state and all") {
  Fixture f;
  // The updates' norms, unclipped.
  const ef::FusionReport probe = ef::run_fusion(ef::parse_fusion_job(
      clip_job(f, "target", "probe", R"({"norm": 1e9, "resume_state": false})")));
  REQUIRE(probe.clip);
  REQUIRE(probe.clip->clients == std::vector<std::string>{"a", "b"});
  CHECK(probe.clip->unclipped == 2);
  const double C = 0.5 * (probe.clip->norms[0] + probe.clip->norms[1]);

  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(
      clip_job(f, "target", "fused",
               R"({"norm": )" + std::to_string(C) +
                   R"(, "noise_multiplier": 0.3, "seed": 9, "resume_state": false})")));
  REQUIRE(r.clip);
  CHECK(r.clip->rule == "fixed");
  CHECK(r.clip->round == 1);
  CHECK(r.clip->unclipped == 1);
  CHECK(r.clip->next_norm == r.clip->norm);
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server_lr = 0.5f;
  opt.clip = ef::ClipOptions{r.clip->norm, 0.3, 9, 1};
  ef::Aggregator agg(f.layout, opt);
  agg.add(ef::views_of(f.updates[0]), ef::parse_plan(kPlanA, f.layout, "p"), 2.0f, "a");
  agg.add(ef::views_of(f.updates[1]), ef::parse_plan(kPlanB, f.layout, "p"), 3.0f, "b");
  CHECK(
      same_checkpoints(ef::Checkpoint::open(f.dir / "fused"), agg.finalize(ef::views_of(f.ckpt))));
  CHECK(agg.clipping()->factors == r.clip->factors);
  const auto state = state_of(f.dir / "fused");
  CHECK(state.at("round") == 1);
  CHECK(state.at("rule") == "fixed");
  CHECK(state.at("next_norm").get<double>() == r.clip->norm);
  const std::string report = ef::test::read_text(f.dir / "fused.report.json");
  CHECK(report.find(R"("noise_multiplier": 0.3)") != std::string::npos);
  // The next round reads the state: round 2 draws other noise.
  const ef::FusionReport next = ef::run_fusion(ef::parse_fusion_job(
      clip_job(f, "fused", "fused2",
               R"({"norm": )" + std::to_string(C) + R"(, "noise_multiplier": 0.3, "seed": 9})")));
  CHECK(next.clip->round == 2);
  CHECK(next.clip->state_from == f.dir / "fused" / "edgefuse_clip_state.json");
  // The state and the model it was written with carry the same id; beside another model the
  // state is refused before anything is written: the first target (no id), and round 2's
  // output (another id).
  const std::string id = state.at("model").get<std::string>();
  CHECK(id.size() == 16);
  const std::string state_file = (f.dir / "fused" / "edgefuse_clip_state.json").string();
  const auto refused = [&](const std::string& target, const std::string& carries) {
    return state_file + ": it belongs to another model (state id '" + id + "'; the target '" +
           ef::Checkpoint::open(f.dir / target).path().string() + "' carries " + carries +
           "): a clip state is read only beside the model it was written with";
  };
  const std::string norm = R"({"norm": )" + std::to_string(C) + R"(, "state": "fused"})";
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(clip_job(f, "target", "other", norm)));
        }) == refused("target", "none"));
  const std::string id2 = state_of(f.dir / "fused2").at("model").get<std::string>();
  CHECK(id2 != id);
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(clip_job(f, "fused2", "other", norm)));
        }) == refused("fused2", "'" + id2 + "'"));
  CHECK(!fs::exists(f.dir / "other"));
}

TEST_CASE("fuse with \"clip\": adaptive clipping moves the norm round by round") {
  Fixture f;
  const std::string adaptive =
      R"({"adaptive": {"initial": 0.05, "quantile": 0.5, "lr": 0.2, "count_noise": 0.5}, "seed": 4)";
  std::string target = "target";
  double norm = 0.05;
  for (std::uint64_t round = 1; round <= 3; ++round) {
    CAPTURE(round);
    const std::string out = "round" + std::to_string(round);
    const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(
        clip_job(f, target, out, adaptive + (round == 1 ? R"(, "resume_state": false})" : "}"))));
    REQUIRE(r.clip);
    CHECK(r.clip->round == round);
    CHECK(r.clip->norm == norm);
    // b = (unclipped + 0.5·ξ) / 2 with ξ keyed by the seed, the round and tensor 2^32 - 1.
    const double b = (static_cast<double>(r.clip->unclipped) +
                      0.5 * ef::dp_standard_normal(4, round, 0xFFFFFFFFu, 0)) /
                     2.0;
    CHECK(r.clip->unclipped_fraction == doctest::Approx(b).epsilon(1e-15));
    const double next = norm * std::exp(-0.2 * (b - 0.5));
    CHECK(r.clip->next_norm == doctest::Approx(next).epsilon(1e-15));
    CHECK(state_of(f.dir / out).at("next_norm").get<double>() == r.clip->next_norm);
    norm = r.clip->next_norm;
    target = out;
  }
  CHECK(norm != 0.05);
}

TEST_CASE("fuse with \"clip\": a client with a NaN is rejected with its reason, never clipped in") {
  Fixture f;
  auto bad = ef::extract(ef::views_of(f.ckpt), f.layout, ef::parse_plan(kPlanA, f.layout, "p"));
  bad[0].tensor.view().data_as<ef::BFloat16>()[3].bits = 0x7FC0;
  {
    ef::CheckpointWriter w(f.dir / "nan.update");
    for (const auto& t : bad) w.add(t.name, t.tensor.view());
    w.commit();
  }
  const fs::path p = f.dir / "job-nan.json";
  ef::test::write_text(
      p, R"({"target": "target", "schema": "llama", "output": "fused", "mode": "delta",
             "clip": {"norm": 0.5, "resume_state": false}, "clients": [)" +
             kUpdates + R"(, {"name": "nan", "update": "nan.update", "plan": "a.plan.json"}]})");
  const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(p));
  REQUIRE(r.rejected.size() == 1);
  CHECK(r.rejected[0].name == "nan");
  CHECK(r.rejected[0].reason ==
        (f.dir / "nan.update").string() +
            ": tensor 'model.embed_tokens.weight' holds a non-finite value at element 3 (client "
            "rejected)");
  REQUIRE(r.clip);
  CHECK(r.clip->clients == std::vector<std::string>{"a", "b"});
  for (const double n : r.clip->norms) CHECK(std::isfinite(n));
}

TEST_CASE("fuse with \"clip\": bad keys and a missing state are named before anything is written") {
  Fixture f;
  const std::string jf = (f.dir / "job-fused.json").string();
  const auto error = [&](const std::string& clip, const std::string& mode = "delta") {
    return edgefuse_test::error_of(
        [&] { ef::run_fusion(ef::parse_fusion_job(clip_job(f, "target", "fused", clip, mode))); });
  };
  CHECK(error(R"({"norm": 1.0})") ==
        "clip: no clip state '" + (f.dir / "target" / "edgefuse_clip_state.json").string() +
            "' (the previous round writes it into its output; set \"resume_state\": false in "
            "the first round)");
  CHECK(!fs::exists(f.dir / "fused"));
  CHECK(error(R"({"norm": 1.0, "resume_state": false})", "params") ==
        jf + ": \"clip\" needs \"mode\": \"delta\" (it bounds the norms of the clients' updates)");
  CHECK(error(R"({"norm": 0, "resume_state": false})") ==
        jf + ": \"clip\": \"norm\" must be a finite number > 0, got 0");
  CHECK(error(R"({"norm": 1, "adaptive": {}})") ==
        jf + ": \"clip\": give either \"norm\" (fixed clipping) or \"adaptive\"");
  CHECK(error(R"({"norm": 1, "noise_multiplier": 1})") ==
        jf + ": \"clip\": \"seed\" is required with noise (a secret integer that keys it)");
  CHECK(error(R"({"norm": 1, "noise": 1})") ==
        jf + ": \"clip\": unknown key 'noise' (expected norm, adaptive, noise_multiplier, seed, "
             "state, resume_state)");
  CHECK(error(R"({"adaptive": {"quantile": 1.5}})") ==
        jf + ": \"clip\": \"adaptive\": \"quantile\" must be in [0, 1], got 1.5");
  ef::test::write_text(f.dir / "target" / "edgefuse_clip_state.json", R"({"round": 2})");
  CHECK(error(R"({"norm": 1.0})") == (f.dir / "target" / "edgefuse_clip_state.json").string() +
                                         ": not a clip state (no \"edgefuse_clip_state\" key)");
  CHECK(!fs::exists(f.dir / "fused"));
}
#endif
