// Parity with Flower 1.42's server strategies: `edgefuse fuse` jobs (params mode, eleven
// whole-model clients weighted by their sample counts) against the outputs of the real
// strategies kept as fixtures (tests/flower/, made by tests/flower/make_flower_fixtures.sh):
// FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan on one round, FedAvgM, FedAdam
// (with Flower's bias correction), FedYogi and FedAdagrad over three rounds with their state on
// disk. Flower computes some rules in float64; edgefuse in float32: equal to float32 rounding.
#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "edgefuse/engine/fuse.h"
#include "edgefuse/io/checkpoint.h"
#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kFixtures = EDGEFUSE_FLOWER_FIXTURES;
// Four float32 units in the last place of 1 (measured: at most 2.4e-7, FedAvgM and FedAdam).
constexpr double kUlps = 4 * 1.1920928955078125e-7;

struct Flower {
  ef::Checkpoint outputs = ef::Checkpoint::open(kFixtures / "flower_parity.safetensors");
  json meta = json::parse(ef::test::read_text(kFixtures / "flower_parity.json"));
  std::vector<std::string> names;  // the model's tensors
  ef::test::ScratchDir dir;

  Flower() {
    for (const auto& item : meta.at("schema").at("tensors").items()) names.push_back(item.key());
    ef::test::write_text(dir / "schema.json", meta.at("schema").dump());
    ef::test::write_text(dir / "full.plan.json", "{}");
  }
  std::size_t clients() const { return meta.at("clients").get<std::size_t>(); }
  static std::string client_name(std::size_t c) {
    return c < 10 ? "c0" + std::to_string(c) : "c" + std::to_string(c);
  }

  // The fixture's tensor `prefix`.<name>.
  std::vector<float> values(const std::string& prefix, const std::string& name) const {
    const ef::ConstTensorView v = outputs.view(prefix + "." + name);
    REQUIRE(v.dtype() == ef::DType::kF32);
    return std::vector<float>(v.data_as<float>(), v.data_as<float>() + v.shape().numel());
  }
  // Writes a model folder: each tensor from `make(name)`.
  template <typename F>
  void write_model(const fs::path& folder, F make) const {
    ef::WriteOptions wo;
    wo.replace_existing = true;
    ef::CheckpointWriter w(folder, wo);
    std::vector<std::vector<float>> keep;
    for (const auto& n : names) {
      keep.push_back(make(n));
      w.add(n, ef::ConstTensorView(keep.back().data(), ef::DType::kF32,
                                   outputs.view("initial." + n).shape()));
    }
    w.commit();
  }
  // A params-mode job of the eleven clients <c>.update (weights of `round`) on `target`.
  fs::path job(const std::string& target, const std::string& output, std::size_t round,
               const std::string& extra) const {
    std::string clients;
    for (std::size_t c = 0; c < this->clients(); ++c) {
      clients += (c ? ", " : "") + std::string(R"({"name": ")") + client_name(c) +
                 R"(", "update": ")" + client_name(c) +
                 R"(.update", "plan": "full.plan.json", "weight": )" +
                 std::to_string(meta.at("weights").at(round - 1).at(c).get<int>()) + "}";
    }
    const fs::path p = dir / "job.json";
    ef::test::write_text(p, R"({"target": ")" + target +
                                R"(", "schema": "schema.json", "output": ")" + output +
                                R"(", "replace": true, "mode": "params")" + extra +
                                R"(, "clients": [)" + clients + "]}");
    return p;
  }
  // How far the fused model `folder` is from the fixture's `prefix` tensors: the largest
  // |got - want| / max(1, |want|) over every element.
  double distance(const fs::path& folder, const std::string& prefix) const {
    const ef::Checkpoint got = ef::Checkpoint::open(folder);
    double worst = 0.0;
    for (const auto& n : names) {
      const auto want = values(prefix, n);
      const ef::ConstTensorView g = got.view(n);
      REQUIRE(g.shape().numel() == want.size());
      for (std::size_t i = 0; i < want.size(); ++i) {
        const double d = std::fabs(static_cast<double>(g.data_as<float>()[i]) - want[i]);
        worst = std::max(worst, d / std::max(1.0, std::fabs(static_cast<double>(want[i]))));
      }
    }
    return worst;
  }
};

}  // namespace

TEST_CASE("Flower 1.42 parity: FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan") {
  Flower fl;
  REQUIRE(fl.meta.at("flwr") == "1.42.0");
  fl.write_model(fl.dir / "initial", [&](const std::string& n) { return fl.values("initial", n); });
  for (std::size_t c = 0; c < fl.clients(); ++c) {
    fl.write_model(fl.dir / (Flower::client_name(c) + ".update"), [&](const std::string& n) {
      return fl.values("round1.client" + std::to_string(c), n);
    });
  }
  struct Rule {
    const char* flower;
    std::string aggregation;
  };
  const json& agg = fl.meta.at("aggregation");
  const std::vector<Rule> rules{
      {"fedavg", R"("mean")"},
      {"fedmedian", R"("median")"},
      {"fedtrimmedavg", R"({"rule": "trimmed_mean", "beta": 0.2})"},
      {"krum", R"({"rule": "krum", "f": 2})"},
      {"multikrum", R"({"rule": "multi_krum", "f": 2, "m": 4})"},
      {"bulyan", R"({"rule": "bulyan", "f": 2})"},
  };
  for (const Rule& r : rules) {
    const std::string flower = r.flower;
    CAPTURE(flower);
    const ef::FusionReport rep = ef::run_fusion(ef::parse_fusion_job(
        fl.job("initial", "fused", 1, R"(, "aggregation": )" + r.aggregation)));
    CHECK(rep.accepted.size() == fl.clients());
    const double d = fl.distance(fl.dir / "fused", r.flower);
    CHECK(d <= kUlps);
    if (!agg.at(r.flower).contains("selected")) continue;
    REQUIRE(rep.selection);
    std::set<std::string> want, got;
    for (const auto& c : agg.at(r.flower).at("selected")) {
      want.insert(Flower::client_name(c.get<std::size_t>()));
    }
    for (std::size_t i = 0; i < rep.selection->clients.size(); ++i) {
      if (rep.selection->selected[i]) got.insert(rep.selection->clients[i]);
    }
    CHECK(got == want);
    for (const auto& o : fl.meta.at("outliers")) {
      CHECK(got.count(Flower::client_name(o.get<std::size_t>())) == 0);
    }
  }
}

TEST_CASE("Flower 1.42 parity: FedAvgM, FedAdam, FedYogi and FedAdagrad over three rounds") {
  Flower fl;
  const std::size_t rounds = fl.meta.at("rounds").get<std::size_t>();
  fl.write_model(fl.dir / "round0", [&](const std::string& n) { return fl.values("initial", n); });
  for (const auto& item : fl.meta.at("server_optimizer").items()) {
    const std::string rule = item.key();  // not a structured binding: lambdas capture it
    CAPTURE(rule);
    json opt = item.value();
    opt["rule"] = rule;
    for (std::size_t r = 1; r <= rounds; ++r) {
      CAPTURE(r);
      // Flower's clients of round r: its model of round r - 1 plus the round's draws.
      const std::string previous = r == 1 ? "initial" : rule + ".round" + std::to_string(r - 1);
      for (std::size_t c = 0; c < fl.clients(); ++c) {
        fl.write_model(fl.dir / (Flower::client_name(c) + ".update"), [&](const std::string& n) {
          if (r == 1) return fl.values("round1.client" + std::to_string(c), n);
          auto x = fl.values(previous, n);
          const auto d = fl.values("round" + std::to_string(r) + ".delta" + std::to_string(c), n);
          for (std::size_t i = 0; i < x.size(); ++i) x[i] = x[i] + d[i];
          return x;
        });
      }
      json o = opt;
      o["resume_state"] = r > 1;
      // Round r starts from edgefuse's round r - 1 model and the state written beside it.
      const std::string target = r == 1 ? "round0" : rule + std::to_string(r - 1);
      const ef::FusionReport rep = ef::run_fusion(ef::parse_fusion_job(
          fl.job(target, rule + std::to_string(r), r, R"(, "server_optimizer": )" + o.dump())));
      REQUIRE(rep.server_optimizer);
      CHECK(rep.server_optimizer->step == r);
      const double d =
          fl.distance(fl.dir / (rule + std::to_string(r)), rule + ".round" + std::to_string(r));
      CHECK(d <= kUlps);
    }
  }
}
