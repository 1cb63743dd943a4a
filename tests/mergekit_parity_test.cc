// Parity with mergekit 0.1.5: `edgefuse fuse` jobs (params mode, three fine-tuned full models
// of a tiny Llama merged onto their base) against what the real mergekit made of the same
// models with ties (normalised and not), dare_ties and dare_linear, kept as fixtures
// (tests/mergekit/, made by tests/mergekit/make_mergekit_fixtures.sh, where DARE's draw is
// edgefuse's documented mask and mergekit does the rest). mergekit sums in float32 and
// edgefuse in double: equal to float32 rounding.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "edgefuse/engine/fuse.h"
#include "edgefuse/extract/extract.h"
#include "edgefuse/io/checkpoint.h"
#include "tests/error_of.h"
#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kFixtures = EDGEFUSE_MERGEKIT_FIXTURES;
// Four float32 units in the last place of the larger of 1 and the value.
constexpr double kUlps = 4 * 1.1920928955078125e-7;

struct Mergekit {
  ef::Checkpoint fixtures = ef::Checkpoint::open(kFixtures / "mergekit_parity.safetensors");
  json meta = json::parse(ef::test::read_text(kFixtures / "mergekit_parity.json"));
  std::vector<std::string> names;
  ef::test::ScratchDir dir;

  Mergekit() {
    for (const auto& item : meta.at("schema").at("tensors").items()) names.push_back(item.key());
    ef::test::write_text(dir / "schema.json", meta.at("schema").dump());
    ef::test::write_text(dir / "full.plan.json", "{}");
    for (const std::string model : {"base", "m0", "m1", "m2"}) {
      ef::WriteOptions wo;
      ef::CheckpointWriter w(dir / model, wo);
      for (const auto& n : names) w.add(n, fixtures.view(model + "." + n));
      w.commit();
    }
  }
  fs::path job(const std::string& aggregation,
               const std::string& m2_plan = "full.plan.json") const {
    std::string clients;
    for (std::size_t c = 0; c < 3; ++c) {
      const std::string m = meta.at("models").at(c);
      clients += (c ? ", " : "") + std::string(R"({"name": ")") + m + R"(", "update": ")" + m +
                 (c == 2 && m2_plan != "full.plan.json" ? ".half" : "") + R"(", "plan": ")" +
                 (c == 2 ? m2_plan : "full.plan.json") + R"(", "weight": )" +
                 meta.at("weights").at(c).dump() + "}";
    }
    const fs::path p = dir / "job.json";
    ef::test::write_text(p, R"({"target": "base", "schema": "schema.json", "output": "merged", )"
                            R"("replace": true, "mode": "params", "aggregation": )" +
                                aggregation + R"(, "clients": [)" + clients + "]}");
    return p;
  }
  // The largest |got - want| / max(1, |want|) between the merged model and mergekit's.
  double distance(const std::string& merge) const {
    const ef::Checkpoint got = ef::Checkpoint::open(dir / "merged");
    double worst = 0.0;
    for (const auto& n : names) {
      const ef::ConstTensorView want = fixtures.view(merge + "." + n);
      const ef::ConstTensorView g = got.view(n);
      REQUIRE(g.shape() == want.shape());
      for (std::size_t i = 0; i < want.numel(); ++i) {
        const double w = want.data_as<float>()[i];
        worst = std::max(worst, std::fabs(g.data_as<float>()[i] - w) / std::max(1.0, std::fabs(w)));
      }
    }
    return worst;
  }
};

}  // namespace

TEST_CASE("mergekit 0.1.5 parity: ties, ties not normalised, dare_ties, dare_linear") {
  Mergekit mk;
  REQUIRE(mk.meta.at("mergekit") == "0.1.5");
  const std::string seed = std::to_string(mk.meta.at("seed").get<int>());
  const std::vector<std::pair<std::string, std::string>> merges{
      {"ties", R"({"rule": "ties", "density": 0.5})"},
      {"ties_unnormalized", R"({"rule": "ties", "density": 0.3, "normalize": false})"},
      {"dare_ties", R"({"rule": "dare_ties", "density": 0.6, "seed": )" + seed + "}"},
      {"dare_linear",
       R"({"rule": "dare_linear", "density": 0.7, "normalize": true, "seed": )" + seed + "}"},
  };
  for (const auto& rule : merges) {
    const std::string& merge = rule.first;
    const std::string& aggregation = rule.second;
    CAPTURE(merge);
    const ef::FusionReport rep = ef::run_fusion(ef::parse_fusion_job(mk.job(aggregation)));
    CHECK(rep.accepted.size() == 3);
    CHECK(mk.distance(merge) <= kUlps);
    if (merge == "dare_ties") {
      const json report = json::parse(ef::test::read_text(mk.dir / "merged.report.json"));
      CHECK(report.at("aggregation") == json::parse(R"({"rule": "dare_ties", "density": 0.6,
          "majority_sign": "sum", "seed": 11, "normalize": false, "rescale": true})"));
    }
  }
  // The weighted mean is far from each of them: the fixtures tell the rules apart.
  ef::run_fusion(ef::parse_fusion_job(mk.job(R"("mean")")));
  for (const auto& merge : {"ties", "ties_unnormalized", "dare_ties", "dare_linear"}) {
    CHECK(mk.distance(merge) > 1e-3);
  }
}

TEST_CASE("task merge jobs: bad keys, a missing seed, a sub-model client, nothing written") {
  Mergekit mk;
  const std::string jf = (mk.dir / "job.json").string();
  const std::string where = jf + ": \"aggregation\": ";
  auto error_of_job = [&](const std::string& aggregation) {
    return edgefuse_test::error_of([&] { ef::parse_fusion_job(mk.job(aggregation)); });
  };
  CHECK(error_of_job(R"({"rule": "ties", "seed": 1})") ==
        where +
            "unknown key 'seed' for rule ties (expected rule, density, normalize, rescale, "
            "majority_sign)");
  CHECK(error_of_job(R"({"rule": "dare_linear", "majority_sign": "sum", "seed": 1})") ==
        where +
            "unknown key 'majority_sign' for rule dare_linear (expected rule, density, "
            "normalize, rescale, seed)");
  CHECK(error_of_job(R"({"rule": "dare_ties", "density": 0.5})") ==
        where +
            "rule dare_ties draws its masks: \"seed\" is required (the same seed gives the "
            "same masks)");
  CHECK(error_of_job(R"({"rule": "ties", "density": 1.5})") ==
        where + "\"density\" must be a number in (0, 1], got 1.5");
  CHECK(error_of_job(R"({"rule": "ties", "majority_sign": "total"})") ==
        where + "\"majority_sign\" must be \"sum\" or \"count\", got \"total\"");
  CHECK(error_of_job(R"({"rule": "dare_ties", "seed": -1, "density": 0.5})") ==
        where + "\"seed\" must be an integer >= 0, got -1");
  // A client holding half the hidden width: the round fails before anything is written.
  const std::string half = R"({"hidden": [0, 1, 2, 3]})";
  ef::test::write_text(mk.dir / "half.plan.json", half);
  {
    const ef::Checkpoint m2 = ef::Checkpoint::open(mk.dir / "m2");
    std::vector<ef::TensorMeta> metas;
    for (const auto& n : mk.names) {
      metas.push_back({n, ef::DType::kF32, m2.view(n).shape()});
    }
    const ef::ModelLayout layout =
        ef::Schema::from_json(mk.meta.at("schema").dump(), "schema").bind(metas);
    const auto sub = ef::extract(ef::views_of(m2), layout, ef::parse_plan(half, layout, "half"));
    ef::WriteOptions wo;
    ef::CheckpointWriter w(mk.dir / "m2.half", wo);
    for (const auto& t : sub) w.add(t.name, t.tensor.view());
    w.commit();
  }
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(ef::parse_fusion_job(
              mk.job(R"({"rule": "ties", "density": 0.5})", "half.plan.json")));
        }) ==
        "aggregate: the task merge 'mergekit_ties' needs clients that cover the whole of "
        "each tensor they send; " +
            (mk.dir / "m2.half").string() +
            " covers 128 of the 256 elements of tensor 'lm_head.weight'");
  CHECK(!fs::exists(mk.dir / "merged"));
}
