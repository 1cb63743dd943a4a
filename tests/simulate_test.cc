// `edgefuse simulate`'s engine (engine/simulate.h): shapes that match the parameter count,
// a round equal to the Aggregator over materialised clients bit for bit, the same bytes for
// any thread count and memory budget, the scalar verify mode, and bad options.
#include "edgefuse/engine/simulate.h"

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/extract/extract.h"
#include "edgefuse/plan/plan.h"
#include "src/engine/simulate_values.h"
#include "src/kernels/generate.h"
#include "tests/error_of.h"

namespace ef = edgefuse;

namespace {

// The fused model as one byte string, in sink order; with a server optimizer its new state's
// m and v pieces ("<tensor>.m", "<tensor>.v") into `state`[0] and [1].
std::string run(const ef::SimulationOptions& o, ef::SimulationReport* rep = nullptr,
                std::string* state = nullptr) {
  std::string bytes;
  std::size_t last = static_cast<std::size_t>(-1), calls = 0;
  auto r = ef::run_simulation(
      o, [&](std::size_t t, const std::string& name, const std::byte* p, std::size_t n) {
        CHECK((last == static_cast<std::size_t>(-1) || t >= last));  // layout order
        last = t;
        const auto c = reinterpret_cast<const char*>(p);
        const std::string suffix = name.size() > 2 ? name.substr(name.size() - 2) : "";
        if (suffix == ".m" || suffix == ".v") {
          REQUIRE(state != nullptr);
          state[suffix == ".m" ? 0 : 1].append(c, n);
          return;
        }
        ++calls;
        bytes.append(c, n);
      });
  CHECK(calls >= r.shape.tensors);
  if (rep) *rep = r;
  return bytes;
}

ef::SimulationOptions small() {
  ef::SimulationOptions o;
  o.target_params = 3e6;
  o.client_params = 2e5;
  o.clients = 7;
  o.seed = 11;
  o.round = 2;
  o.server_lr = 0.5f;
  return o;
}

}  // namespace

TEST_CASE("simulate: Llama shapes within 1% of the parameter count (3% below 1e8), GQA-valid") {
  for (double p : {1e6, 3e7, 1e9, 7e9, 1e10, 7e10, 1e11, 4e11, 1e12}) {
    CAPTURE(p);
    const ef::ModelConfig c = ef::llama_config_for(p);
    ef::SimulationOptions o;
    o.target_params = p;
    o.client_params = 1;  // shapes only: the chooser is not asked below
    const auto metas = c.layers < 200 ? ef::llama_tensor_metas(c, ef::DType::kBF16)
                                      : std::vector<ef::TensorMeta>{};
    std::uint64_t n = 0;
    for (const auto& m : metas) n += m.shape.numel();
    if (!metas.empty()) CHECK(std::fabs(static_cast<double>(n) - p) / p < (p >= 1e8 ? 0.01 : 0.03));
    CHECK(c.heads % c.kv_heads == 0);
    CHECK(c.kv_heads <= 8);
    CHECK(c.intermediate % 256 == 0);
  }
  const ef::ModelConfig c = ef::llama_config_for(100e9);
  CHECK(c.hidden == 9216);
  CHECK(c.layers == 92);
  CHECK(c.heads == 72);
  CHECK(c.kv_heads == 8);
  CHECK(c.intermediate == 32256);
  CHECK(c.vocab == 32000);
  ef::SimulationOptions o;
  o.target_params = 100e9;
  o.client_params = 100e6;
  o.clients = 1000;
  const auto s = ef::simulation_shape(o);
  CHECK(s.target_params == 100'002'825'216ULL);  // Python, from the config's formula
  CHECK(s.tensors == 831);
  CHECK(s.client.width.to_string() == "1/8");
  CHECK(s.client.layers == 1);
  CHECK(s.client.params <= 100'000'000u);
}

namespace {

// The round of `o` against the same round with every tensor in memory, bit for bit.
void check_against_materialised(const ef::SimulationOptions& o) {
  ef::SimulationReport rep;
  std::string state[2];
  const std::string got = run(o, &rep, state);
  CHECK(rep.shape.target_params == got.size() / 2);
  // The same round with every tensor in memory: generated target (bf16), generated client
  // updates (f32, client-local element order), add() and finalize().
  const auto metas = ef::llama_tensor_metas(rep.shape.target, ef::DType::kBF16);
  const ef::ModelLayout layout = ef::Schema::preset("llama", rep.shape.target).bind(metas);
  std::vector<ef::NamedTensor> target;
  for (std::size_t t = 0; t < metas.size(); ++t) {
    ef::Tensor x = ef::Tensor::empty(ef::DType::kBF16, metas[t].shape);
    const std::uint64_t key = ef::detail::sim_target_key(o.seed, t);
    for (std::uint64_t i = 0; i < x.numel(); ++i) {
      x.view().data_as<ef::BFloat16>()[i] =
          ef::to_bf16(ef::detail::uniform_at(key, i, ef::detail::kSimTargetScale));
    }
    target.push_back({metas[t].name, std::move(x)});
  }
  ef::AggregateOptions ao;
  ao.mode = ef::AggregateMode::kDelta;
  ao.server_lr = o.server_lr;
  ao.robust = o.robust;
  ao.server = o.server;
  if (ao.server) ao.server->delta = true;
  ef::Aggregator agg(layout, ao);
  std::vector<std::vector<ef::NamedTensor>> clients;
  for (std::size_t c = 0; c < o.clients; ++c) {
    const ef::Plan plan =
        ef::parse_plan(ef::detail::sim_client_plan_json(rep.shape, c, o.round), layout, "p");
    std::vector<ef::NamedTensor> local;
    for (const auto& ct : ef::client_tensors(layout, plan, ef::DType::kF32)) {
      ef::Tensor x = ef::Tensor::empty(ef::DType::kF32, ct.shape);
      const std::uint64_t key = ef::detail::sim_client_key(o.seed, c, ct.target_index);
      for (std::uint64_t i = 0; i < x.numel(); ++i) {
        x.view().data_as<float>()[i] = ef::detail::uniform_at(key, i, ef::detail::kSimDeltaScale);
      }
      local.push_back({ct.name, std::move(x)});
    }
    clients.push_back(std::move(local));
    agg.add(ef::views_of(clients.back()), plan, ef::detail::sim_client_weight(c), "c");
  }
  std::vector<ef::TensorCoverage> cov;
  std::string want_bytes, want_state[2];
  if (o.server) {  // the previous state generated as simulate does: m in ±1e-3, v in [0, 1e-6]
    std::vector<std::vector<float>> m(metas.size()), v(metas.size());
    ef::ServerState s;
    std::vector<ef::TensorView> out;
    std::vector<std::vector<ef::BFloat16>> fused(metas.size());
    for (std::size_t t = 0; t < metas.size(); ++t) {
      const std::uint64_t n = metas[t].shape.numel();
      m[t].resize(n);
      v[t].resize(n);
      fused[t].resize(n);
      for (std::uint64_t i = 0; i < n; ++i) {
        m[t][i] = ef::detail::uniform_at(ef::detail::sim_state_key(o.seed, t, 0), i, 1e-3f);
        v[t][i] = ef::detail::uniform_at(ef::detail::sim_state_key(o.seed, t, 1), i, 5e-7f) + 5e-7f;
      }
      s.m.push_back(ef::TensorView(m[t].data(), ef::DType::kF32, metas[t].shape));
      s.v.push_back(ef::TensorView(v[t].data(), ef::DType::kF32, metas[t].shape));
      out.push_back(ef::TensorView(fused[t].data(), ef::DType::kBF16, metas[t].shape));
    }
    cov = agg.finalize(ef::views_of(target), out, s);
    for (std::size_t t = 0; t < metas.size(); ++t) {
      want_bytes.append(reinterpret_cast<const char*>(fused[t].data()), fused[t].size() * 2);
      want_state[0].append(reinterpret_cast<const char*>(m[t].data()), m[t].size() * 4);
      want_state[1].append(reinterpret_cast<const char*>(v[t].data()), v[t].size() * 4);
    }
  } else {
    for (const auto& t : agg.finalize(ef::views_of(target), &cov)) {
      want_bytes.append(reinterpret_cast<const char*>(t.tensor.view().bytes()), t.tensor.nbytes());
    }
  }
  std::uint64_t covered = 0;
  for (const auto& c : cov) covered += c.covered;
  CHECK(got == want_bytes);
  CHECK(state[0] == want_state[0]);
  CHECK(state[1] == want_state[1]);
  CHECK(rep.covered == covered);
  CHECK(rep.covered > 0);
  CHECK(rep.covered < rep.shape.target_params);
  CHECK(rep.client_values == o.clients * rep.shape.client.params);
  CHECK(rep.bytes_moved == 2 * (2 * rep.shape.target_params + rep.client_values) +
                               (o.server ? 16 * rep.shape.target_params : 0));
}

}  // namespace

TEST_CASE("simulate: the round equals the Aggregator over materialised clients, bit for bit") {
  check_against_materialised(small());
}

TEST_CASE("simulate: a median round and a FedAdam step equal the Aggregator's, state and all") {
  ef::SimulationOptions o = small();
  o.robust = ef::RobustAggregate{ef::RobustRule::kMedian, 0.0};
  check_against_materialised(o);
  o.robust = ef::RobustAggregate{ef::RobustRule::kTrimmedMean, 0.2};
  o.server = ef::ServerStep{};  // FedAdam, lr 1, the paper's betas and tau
  o.server->lr = 0.1f;
  check_against_materialised(o);
  o.verify_rows = 3;
  CHECK_THROWS_WITH(ef::run_simulation(o, {}),
                    "simulate: verify recomputes the weighted mean; it does not check a robust "
                    "aggregate or a server optimizer's step");
}

TEST_CASE("simulate: the same bytes for any thread count and memory budget, verify mode agrees") {
  ef::set_num_threads(2);  // the caller's count, restored after every run
  ef::SimulationOptions o = small();
  o.threads = 1;
  const std::string ref = run(o);
  for (std::size_t threads : {2, 3}) {
    o.threads = threads;
    o.memory_budget = threads == 2 ? (std::uint64_t{2} << 30) : (std::uint64_t{2} << 20);
    ef::SimulationReport rep;
    CHECK(run(o, &rep) == ref);
    CHECK(rep.threads == threads);
    if (threads == 3) CHECK(rep.chunk_elements == 65536);  // a 2 MiB budget: small chunks and tiles
  }
  o.verify_rows = 40;
  ef::SimulationReport rep;
  CHECK(run(o, &rep) == ref);
  CHECK(rep.verified_rows == 40);
  o.seed = 12;  // another seed: other values
  CHECK(run(o) != ref);
  CHECK(ef::num_threads() == 2);
  ef::set_num_threads(0);
}

TEST_CASE("simulate: bad options are errors before any work") {
  ef::SimulationOptions o = small();
  o.clients = 0;
  CHECK_THROWS_WITH(ef::simulation_shape(o), "clients = 0 must be in [1, 10^6]");
  o = small();
  o.client_params = 10;
  CHECK_THROWS_WITH(ef::simulation_shape(o),
                    doctest::Contains("choose_budget: even one KV group of one layer"));
  o = small();
  o.target_params = 10;
  CHECK_THROWS_WITH(ef::simulation_shape(o), "target size of 10 parameters is outside [1e5, 1e13]");
  o = small();
  o.memory_budget = 100000;
  CHECK_THROWS_WITH(ef::run_simulation(o, {}),
                    doctest::Contains("memory budget of 100000 bytes is too small"));
  // The clients' plans and row lists count: 20000 clients do not fit a 2 MiB budget.
  o = small();
  o.memory_budget = std::uint64_t{2} << 20;
  ef::SimulationReport rep;
  run(o, &rep);
  CHECK(rep.client_state_bytes > 0);
  CHECK(rep.client_state_bytes < o.memory_budget);
  // It fails as soon as the state built exceeds the budget, long before the 20000th client,
  // and says what all of them would need.
  o.clients = 20000;
  const std::string err = edgefuse_test::error_of([&] { ef::run_simulation(o, {}); });
  CHECK(err.find("memory budget: after ") == 0);
  const std::size_t built = std::stoul(err.substr(std::string("memory budget: after ").size()));
  CHECK(built > 1);
  CHECK(built < 20000);
  CHECK(err.find(" of 20000 clients their plans and row lists need ") != std::string::npos);
  CHECK(err.find("raise --memory-budget or simulate fewer clients") != std::string::npos);
}
