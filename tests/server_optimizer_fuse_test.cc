// The engine's "server_optimizer" job key: rounds chained through the state written beside each
// model equal the in-memory steps bit for bit, the state is tied to its model by an id, bad keys
// and states are named before anything is written, and a round SIGKILLed at random instants
// and started again ends with the same model and state bytes.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/engine/fuse.h"
#include "tests/error_of.h"
#include "tests/fuse_fixture.h"

#if defined(EDGEFUSE_CLI)
namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

using ef::test::Fixture;
using ef::test::kUpdates;

// A delta job of the fixture's two updates from `target` to `output` with `optimizer`.
fs::path optimizer_job(const Fixture& f, const std::string& target, const std::string& output,
                       const std::string& optimizer, const std::string& extra = "") {
  const fs::path p = f.dir / ("job-" + output + ".json");
  ef::test::write_text(p, R"({"target": ")" + target + R"(", "schema": "llama", "output": ")" +
                              output + R"(", "mode": "delta", "server_optimizer": )" + optimizer +
                              extra + R"(, "clients": [)" + kUpdates + "]}");
  return p;
}

// The round in memory: the fixture's updates (weights 2 and 3) stepped from `target` with the
// state `state` (m, v per layout tensor; updated in place). Returns the new weights.
std::vector<ef::NamedTensor> reference_round(const Fixture& f, const ef::NamedViews& target,
                                             const ef::ServerStep& step,
                                             std::vector<ef::NamedTensor>& state,
                                             std::optional<ef::RobustAggregate> robust = {}) {
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server = step;
  opt.robust = robust;
  ef::Aggregator agg(f.layout, opt);
  agg.add(ef::views_of(f.updates[0]), ef::parse_plan(ef::test::kPlanA, f.layout, "a"), 2.0f, "a");
  agg.add(ef::views_of(f.updates[1]), ef::parse_plan(ef::test::kPlanB, f.layout, "b"), 3.0f, "b");
  const bool with_v = ef::server_rule_has_v(step.rule);
  std::vector<ef::NamedTensor> out;
  std::vector<ef::TensorView> out_views;
  ef::ServerState views;
  for (std::size_t i = 0; i < f.layout.tensors().size(); ++i) {
    const auto& meta = f.layout.tensors()[i].meta;
    out.push_back({meta.name, ef::Tensor::empty(meta.dtype, meta.shape)});
    out_views.push_back(out.back().tensor.view());
    views.m.push_back(state[i * (with_v ? 2 : 1)].tensor.view());
    if (with_v) views.v.push_back(state[2 * i + 1].tensor.view());
  }
  agg.finalize(target, out_views, views);
  return out;
}

std::vector<ef::NamedTensor> zero_state(const ef::ModelLayout& layout, bool with_v) {
  std::vector<ef::NamedTensor> out;
  for (const auto& t : layout.tensors()) {
    for (const char which : {'m', 'v'}) {
      if (which == 'v' && !with_v) continue;
      auto x = ef::Tensor::empty(ef::DType::kF32, t.meta.shape);
      std::memset(x.view().bytes(), 0, x.nbytes());
      out.push_back({ef::server_state_name(t.meta.name, which), std::move(x)});
    }
  }
  return out;
}

std::string metadata(const fs::path& file, const std::string& key) {
  const auto c = ef::Checkpoint::open(file);
  const auto& m = c.shards().front().metadata();
  const auto it = m.find(key);
  return it == m.end() ? "(none)" : it->second;
}

}  // namespace

TEST_CASE(
    "fuse with fedadam: rounds chained through the state beside each model equal the "
    "in-memory steps") {
  Fixture f;
  ef::ServerStep step;
  step.rule = ef::ServerRule::kFedAdam;
  step.lr = 0.05f;
  auto state = zero_state(f.layout, true);
  // Round 1 from zeros.
  const ef::FusionReport r1 = ef::run_fusion(ef::parse_fusion_job(optimizer_job(
      f, "target", "r1", R"({"rule": "fedadam", "lr": 0.05, "resume_state": false})")));
  const auto want1 = reference_round(f, ef::views_of(f.ckpt), step, state);
  CHECK(ef::test::same_checkpoints(ef::Checkpoint::open(f.dir / "r1"), want1));
  CHECK(ef::test::same_checkpoints(ef::Checkpoint::open(f.dir / "r1" / "server_state.safetensors"),
                                   state));
  REQUIRE(r1.server_optimizer);
  CHECK(r1.server_optimizer->rule == "fedadam");
  CHECK(r1.server_optimizer->step == 1);
  CHECK(r1.server_optimizer->lr_applied == doctest::Approx(0.05));
  CHECK(r1.server_optimizer->state_from.empty());
  CHECK(r1.server_optimizer->state_tensors == 2 * f.layout.tensors().size());
  CHECK(r1.server_optimizer->state_bytes == 2 * 2 * f.ckpt.total_bytes());  // bf16 -> 2 x f32
  CHECK(r1.bytes_written == f.ckpt.total_bytes() + r1.server_optimizer->state_bytes);
  // The model and its state carry the same id; the state its rule and step count.
  const std::string id1 = metadata(f.dir / "r1" / "model.safetensors", "edgefuse_server_state");
  CHECK(id1.size() == 16);
  CHECK(metadata(f.dir / "r1" / "server_state.safetensors", "edgefuse_server_state") == id1);
  CHECK(metadata(f.dir / "r1" / "server_state.safetensors", "edgefuse_server_rule") == "fedadam");
  CHECK(metadata(f.dir / "r1" / "server_state.safetensors", "edgefuse_server_step") == "1");
  const std::string report = ef::test::read_text(f.dir / "r1.report.json");
  CHECK(report.find(R"("server_optimizer": {)") != std::string::npos);
  CHECK(report.find(R"("state_from": null)") != std::string::npos);

  // Round 2 from round 1's folder: its state is found beside the model.
  const ef::Checkpoint t2 = ef::Checkpoint::open(f.dir / "r1");
  const ef::FusionReport r2 = ef::run_fusion(
      ef::parse_fusion_job(optimizer_job(f, "r1", "r2", R"({"rule": "fedadam", "lr": 0.05})")));
  const auto want2 = reference_round(f, ef::views_of(t2), step, state);
  CHECK(ef::test::same_checkpoints(ef::Checkpoint::open(f.dir / "r2"), want2));
  CHECK(ef::test::same_checkpoints(ef::Checkpoint::open(f.dir / "r2" / "server_state.safetensors"),
                                   state));
  CHECK(r2.server_optimizer->step == 2);
  CHECK(r2.server_optimizer->state_from == f.dir / "r1" / "server_state.safetensors");
  CHECK(metadata(f.dir / "r2" / "server_state.safetensors", "edgefuse_server_step") == "2");
  const std::string id2 = metadata(f.dir / "r2" / "model.safetensors", "edgefuse_server_state");
  CHECK(id2 != id1);
  CHECK(metadata(f.dir / "r2" / "server_state.safetensors", "edgefuse_server_state") == id2);
  // The round moved the weights and the state: the test cannot pass on an idle step.
  CHECK(ef::test::bytes_of(f.dir / "r2") != ef::test::bytes_of(f.dir / "r1"));

  // The same round again, one thread and small tiles: the same files, state and id included.
  const std::string model2 = ef::test::read_text(f.dir / "r2" / "model.safetensors");
  const std::string state2 = ef::test::read_text(f.dir / "r2" / "server_state.safetensors");
  ef::run_fusion(ef::parse_fusion_job(
      optimizer_job(f, "r1", "r2b", R"({"rule": "fedadam", "lr": 0.05, "state": "r1"})",
                    R"(, "threads": 1, "memory_budget": 60000000)")));
  CHECK(ef::test::read_text(f.dir / "r2b" / "model.safetensors") == model2);
  CHECK(ef::test::read_text(f.dir / "r2b" / "server_state.safetensors") == state2);
  ef::set_num_threads(0);
}

TEST_CASE("fuse with a server optimizer: each rule's step, and fedadam's bias correction") {
  Fixture f;
  struct Case {
    const char* json;
    ef::ServerStep step;
    std::optional<ef::RobustAggregate> robust = {};
  };
  ef::ServerStep avgm{ef::ServerRule::kFedAvgM};
  avgm.lr = 1.0f;
  avgm.momentum = 0.5f;
  ef::ServerStep nesterov{ef::ServerRule::kNesterov};
  nesterov.lr = 0.7f;
  ef::ServerStep yogi{ef::ServerRule::kFedYogi};
  yogi.lr = 0.01f;
  yogi.beta1 = 0.8f;
  ef::ServerStep adagrad{ef::ServerRule::kFedAdagrad};
  adagrad.lr = 0.1f;
  adagrad.tau = 0.01f;
  ef::ServerStep adam{ef::ServerRule::kFedAdam};
  adam.lr = 0.1f;
  // Flower's bias correction in its first round (server_round 1): lr * sqrt(1 - b2^2) / (1 -
  // b1^2).
  ef::ServerStep corrected = adam;
  corrected.lr = static_cast<float>(0.1 * std::sqrt(1.0 - 0.99 * 0.99) / (1.0 - 0.9 * 0.9));
  for (const Case& c :
       {Case{R"({"rule": "fedavgm", "momentum": 0.5)", avgm},
        Case{R"({"rule": "nesterov")", nesterov}, Case{R"({"rule": "fedyogi", "beta1": 0.8)", yogi},
        Case{R"({"rule": "fedadagrad", "tau": 0.01)", adagrad},
        Case{R"({"rule": "fedadam", "bias_correction": true)", corrected},
        Case{R"({"rule": "fedavgm", "momentum": 0.5)", avgm,
             ef::RobustAggregate{ef::RobustRule::kMedian, 0.0}}}) {
    CAPTURE(c.json);
    CAPTURE(c.robust.has_value());
    const ef::FusionReport r = ef::run_fusion(ef::parse_fusion_job(optimizer_job(
        f, "target", "out", std::string(c.json) + R"(, "resume_state": false})",
        std::string(R"(, "replace": true)") + (c.robust ? R"(, "aggregation": "median")" : ""))));
    auto state = zero_state(f.layout, ef::server_rule_has_v(c.step.rule));
    const auto want = reference_round(f, ef::views_of(f.ckpt), c.step, state, c.robust);
    CHECK(ef::test::same_checkpoints(ef::Checkpoint::open(f.dir / "out"), want));
    CHECK(ef::test::same_checkpoints(
        ef::Checkpoint::open(f.dir / "out" / "server_state.safetensors"), state));
    CHECK(r.server_optimizer->lr_applied == doctest::Approx(c.step.lr).epsilon(1e-7));
  }
  CHECK(std::abs(corrected.lr - 0.1f * 0.742460f) < 1e-6f);  // sqrt(0.0199) / 0.19
}

TEST_CASE("fuse with a server optimizer: bad keys and states are named, nothing is written") {
  Fixture f;
  // A first round to step from.
  ef::run_fusion(ef::parse_fusion_job(
      optimizer_job(f, "target", "r1", R"({"rule": "fedadam", "resume_state": false})")));
  ef::run_fusion(ef::parse_fusion_job(optimizer_job(f, "r1", "r2", R"({"rule": "fedadam"})")));
  auto message = [&](const std::string& target, const std::string& optimizer,
                     const std::string& extra = "") {
    const fs::path job = optimizer_job(f, target, "never", optimizer, extra);
    const std::string e =
        edgefuse_test::error_of([&] { ef::run_fusion(ef::parse_fusion_job(job)); });
    CHECK_FALSE(fs::exists(f.dir / "never"));
    const std::string prefix = job.string() + ": ";
    return e.compare(0, prefix.size(), prefix) == 0 ? e.substr(prefix.size()) : e;
  };
  const std::string so = "\"server_optimizer\": ";
  CHECK(message("target", R"({"rule": "adam"})") ==
        so + "unknown rule \"adam\" (expected fedavgm, fedadam, fedyogi, fedadagrad or nesterov)");
  CHECK(message("target", R"({"lr": 0.1})") ==
        so + "\"rule\" is required (fedavgm, fedadam, fedyogi, fedadagrad or nesterov)");
  CHECK(message("target", R"({"rule": "fedavgm", "beta1": 0.9})") ==
        so + "unknown key 'beta1' for rule fedavgm (expected lr, momentum, state, resume_state)");
  CHECK(message("target", R"({"rule": "fedyogi", "bias_correction": true})") ==
        so + "unknown key 'bias_correction' for rule fedyogi (expected lr, beta1, beta2, tau, "
             "state, resume_state)");
  CHECK(message("target", R"({"rule": "fedadam", "beta2": 1})") ==
        so + "\"beta2\" must be a finite number in [0, 1), got 1");
  CHECK(message("target", R"({"rule": "fedadam", "beta1": -0.1})") ==
        so + "\"beta1\" must be a finite number in [0, 1), got -0.1");
  CHECK(message("target", R"({"rule": "nesterov", "lr": 0})") ==
        so + "\"lr\" must be a finite number > 0, got 0");
  CHECK(message("target", R"({"rule": "fedadam", "tau": "small"})") ==
        so + "\"tau\" must be a finite number > 0, got \"small\"");
  CHECK(message("target", R"({"rule": "fedadam", "resume_state": 1})") ==
        so + "\"resume_state\" must be true or false");
  CHECK(message("target", R"({"rule": "fedadam"})", R"(, "server_lr": 0.5)") ==
        "\"server_lr\" and \"server_optimizer\" do not go together (the optimizer has its own "
        "\"lr\")");
  // States: missing, from another model, of another rule, of another shape.
  const std::string at = "server_optimizer: the previous state in '";
  CHECK(edgefuse_test::error_of([&] {
          ef::run_fusion(
              ef::parse_fusion_job(optimizer_job(f, "target", "never", R"({"rule": "fedadam"})")));
        }) == at + (f.dir / "target").string() +
                  "': there is none (server_state.safetensors or its index); set "
                  "\"resume_state\": false to start from zeros (the first round)");
  const std::string id1 =
      metadata(f.dir / "r1" / "server_state.safetensors", "edgefuse_server_state");
  const std::string id2 = metadata(f.dir / "r2" / "model.safetensors", "edgefuse_server_state");
  CHECK(message("r2", R"({"rule": "fedadam", "state": "r1"})") ==
        at + (f.dir / "r1").string() + "': it belongs to another model (state id '" + id1 +
            "'; the target '" + (f.dir / "r2" / "model.safetensors").string() + "' carries '" +
            id2 + "'): a state is stepped only beside the model it was written with");
  CHECK(message("target", R"({"rule": "fedadam", "state": "r1"})") ==
        at + (f.dir / "r1").string() + "': it belongs to another model (state id '" + id1 +
            "'; the target '" + (f.dir / "target" / "model.safetensors.index.json").string() +
            "' carries none): a state is stepped only beside the model it was written with");
  CHECK(message("r1", R"({"rule": "fedyogi"})") ==
        at + (f.dir / "r1").string() +
            "': it was written by rule 'fedadam' and the job asks for 'fedyogi' (set "
            "\"resume_state\": false to start anew)");
  // A state file of the right id and rule with one tensor of another shape.
  fs::create_directory(f.dir / "bad");
  fs::copy_file(f.dir / "r1" / "model.safetensors", f.dir / "bad" / "model.safetensors");
  fs::copy_file(f.dir / "r1" / "config.json", f.dir / "bad" / "config.json");
  {
    const auto good = ef::Checkpoint::open(f.dir / "r1" / "server_state.safetensors");
    ef::WriteOptions wo;
    wo.file_stem = "server_state";
    wo.metadata = good.shards().front().metadata();
    ef::CheckpointWriter w(f.dir / "bad-state", wo);
    std::vector<float> wrong(5, 0.0f);
    for (const auto& e : good.tensors()) {
      if (e.info->name == "model.norm.weight.v") {
        w.add(e.info->name, ef::ConstTensorView(wrong.data(), ef::DType::kF32, ef::Shape{5}));
      } else {
        w.add(e.info->name, good.view(e.info->name));
      }
    }
    w.commit();
    fs::copy_file(f.dir / "bad-state" / "server_state.safetensors",
                  f.dir / "bad" / "server_state.safetensors");
  }
  CHECK(message("bad", R"({"rule": "fedadam"})") ==
        "server_optimizer: the previous state '" +
            (f.dir / "bad" / "server_state.safetensors").string() +
            "': tensor 'model.norm.weight.v' is F32 [5]; the state of 'model.norm.weight' is F32 "
            "[32]");
}

TEST_CASE(
    "edgefuse fuse with fedadam: SIGKILLed at random instants and started again, the same "
    "model and state") {
  // A 6.6M-parameter target and two sub-model updates, stepped from a state of an earlier
  // round: the pieces read the previous state and write the new one while they are killed.
  const char* config =
      R"({"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
          "num_hidden_layers": 8, "intermediate_size": 688, "vocab_size": 2000, "tie_word_embeddings": true})";
  ef::test::ScratchDir dir;
  ef::test::write_target(dir / "target", config, 4u << 20);
  const auto ckpt = ef::Checkpoint::open(dir / "target");
  const auto layout =
      ef::Schema::preset("llama", ef::parse_model_config(config, "c")).bind(ef::tensor_metas(ckpt));
  const std::string clients = ef::test::write_xor_updates(dir.path(), ckpt, layout, 5);
  auto job = [&](const std::string& target, const std::string& output, const char* resume) {
    const fs::path p = dir / (output + ".json");
    ef::test::write_text(p, R"({"target": ")" + target + R"(", "schema": "llama", "output": ")" +
                                output + R"(", "replace": true, "memory_budget": "96MiB",
        "server_optimizer": {"rule": "fedadam", "lr": 0.01, "resume_state": )" +
                                resume + R"(}, "clients": [)" + clients + "]}");
    return p;
  };
  const auto first = ef::test::cli(dir, {"fuse", job("target", "r1", "false").string(), "--quiet"});
  REQUIRE(first.rc == 0);
  CHECK(first.out.find("server optimizer: fedadam step 1 (lr 0.01, applied 0.01) from zeros; "
                       "wrote " +
                       std::to_string(2 * layout.tensors().size()) + " state tensors (") !=
        std::string::npos);
  const fs::path round2 = job("r1", "r2", "true");
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(ef::test::cli(dir, {"fuse", round2.string(), "--quiet"}).rc == 0);
  const auto full = std::chrono::steady_clock::now() - t0;
  const std::string want_model = ef::test::read_text(dir / "r2" / "model.safetensors");
  const std::string want_state = ef::test::read_text(dir / "r2" / "server_state.safetensors");
  CHECK(want_state.size() > 2 * 4 * 6000000);

  const fs::path journal = dir / ".r2.staging-resume" / "edgefuse-resume.journal";
  auto journaled = [&] {
    std::error_code ec;
    if (!fs::exists(journal, ec)) return std::size_t{0};
    const std::string text = ef::test::read_text(journal);
    return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')) - 1;
  };
  auto ended = [](pid_t pid) {
    siginfo_t info{};
    return ::waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
  };
  std::mt19937_64 rng(7);
  const auto full_us = std::chrono::duration_cast<std::chrono::microseconds>(full).count();
  int kills = 0, resumed_runs = 0;
  std::size_t left = 0;
  for (int run = 0; run < 100 && (kills < 6 || resumed_runs < 2); ++run) {
    const pid_t pid = ef::test::spawn(
        {EDGEFUSE_CLI, "fuse", round2.string(), "--quiet", "--threads", run % 2 ? "1" : "2"},
        dir / "out.txt", dir / "err.txt");
    if (run % 2 == 0) {  // killed 0-20 ms after its journal holds a tensor
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (journaled() == 0 && !ended(pid) && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % (full_us + 1)));
    }
    ::kill(pid, SIGKILL);
    const int rc = ef::test::reap(pid);
    if (rc == -SIGKILL) {
      ++kills;
      left = journaled();
      continue;
    }
    INFO(ef::test::read_text(dir / "err.txt"));
    REQUIRE(rc == 0);
    resumed_runs += left > 0;
    CHECK(ef::test::read_text(dir / "r2" / "model.safetensors") == want_model);
    CHECK(ef::test::read_text(dir / "r2" / "server_state.safetensors") == want_state);
    // Bytes written now and kept from the killed runs add up to the model and the state.
    const auto report = nlohmann::json::parse(ef::test::read_text(dir / "r2.report.json"));
    CHECK(report["bytes_written"].get<std::uint64_t>() +
              report["resumed_bytes"].get<std::uint64_t>() ==
          ckpt.total_bytes() + report["server_optimizer"]["state_bytes"].get<std::uint64_t>());
    CHECK(report["bytes_read"].get<std::uint64_t>() < (std::uint64_t{1} << 40));  // no wrap-around
    CHECK((report["resumed_tensors"].get<std::size_t>() > 0) == (left > 0));
    left = 0;
  }
  MESSAGE("kills " << kills << ", resumed runs " << resumed_runs);
  CHECK(kills >= 6);
  CHECK(resumed_runs >= 2);
}
#endif  // EDGEFUSE_CLI
