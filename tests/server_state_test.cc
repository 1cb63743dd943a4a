// A server optimizer's state streamed beside the model: finalize_to writes the new weights and
// the new state tile by tile through the writer's linked tensors, bit for bit what the
// in-memory step gives, for any piece size and thread count; bad previous states are named.
#include <cstring>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/core/parallel.h"
#include "tests/fuse_fixture.h"

#if defined(EDGEFUSE_CLI)
namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

// A state for every float tensor of the layout: m = 0.01 * ((i * 5 + t) % 17 - 8), v = 0.001 *
// ((i * 3 + t) % 11 + 1) for element i of tensor number t.
std::vector<ef::NamedTensor> previous_state(const ef::ModelLayout& layout, bool with_v) {
  std::vector<ef::NamedTensor> out;
  std::size_t t = 0;
  for (const auto& lt : layout.tensors()) {
    ++t;
    for (const char which : {'m', 'v'}) {
      if (which == 'v' && !with_v) continue;
      auto x = ef::Tensor::empty(ef::DType::kF32, lt.meta.shape);
      float* p = x.view().data_as<float>();
      for (std::size_t i = 0; i < x.numel(); ++i) {
        p[i] = which == 'm' ? 0.01f * (static_cast<float>((i * 5 + t) % 17) - 8.0f)
                            : 0.001f * static_cast<float>((i * 3 + t) % 11 + 1);
      }
      out.push_back({ef::server_state_name(lt.meta.name, which), std::move(x)});
    }
  }
  return out;
}

ef::Aggregator round_of(const ef::test::Fixture& f, const ef::ServerStep& step) {
  ef::AggregateOptions opt;
  opt.mode = ef::AggregateMode::kDelta;
  opt.server = step;
  ef::Aggregator agg(f.layout, opt);
  agg.add(ef::views_of(f.updates[0]), ef::parse_plan(ef::test::kPlanA, f.layout, "a"), 2.0f, "a");
  agg.add(ef::views_of(f.updates[1]), ef::parse_plan(ef::test::kPlanB, f.layout, "b"), 3.0f, "b");
  return agg;
}

std::string bytes(const ef::ConstTensorView& v) {
  return std::string(reinterpret_cast<const char*>(v.bytes()), v.nbytes());
}

}  // namespace

TEST_CASE(
    "finalize_to streams the new server state beside the model, bit for bit the in-memory step") {
  ef::test::Fixture f;
  const ef::NamedViews target = ef::views_of(f.ckpt);
  for (const ef::ServerRule rule : {ef::ServerRule::kFedAdam, ef::ServerRule::kNesterov}) {
    ef::ServerStep step;
    step.rule = rule;
    step.lr = 0.3f;
    const bool with_v = ef::server_rule_has_v(rule);
    for (const bool fresh : {false, true}) {
      CAPTURE(static_cast<int>(rule));
      CAPTURE(fresh);
      // The reference: the in-memory step on copies of the target and the state.
      std::vector<ef::NamedTensor> want_w,
          want_state = fresh ? std::vector<ef::NamedTensor>{} : previous_state(f.layout, with_v);
      const auto before = previous_state(f.layout, with_v);
      ef::ServerState state;
      std::vector<ef::Tensor> zeros;
      std::vector<ef::TensorView> out;
      for (std::size_t i = 0; i < f.layout.tensors().size(); ++i) {
        const auto& meta = f.layout.tensors()[i].meta;
        want_w.push_back({meta.name, ef::Tensor::empty(meta.dtype, meta.shape)});
        out.push_back(want_w.back().tensor.view());
        for (const char which : {'m', 'v'}) {
          if (which == 'v' && !with_v) continue;
          auto& views = which == 'm' ? state.m : state.v;
          if (fresh) {
            zeros.push_back(ef::Tensor::empty(ef::DType::kF32, meta.shape));
            std::memset(zeros.back().view().bytes(), 0, zeros.back().nbytes());
            views.push_back(zeros.back().view());
          } else {
            views.push_back(want_state[i * (with_v ? 2 : 1) + (which == 'v')].tensor.view());
          }
        }
      }
      round_of(f, step).finalize(target, out, state);
      std::size_t moved = 0;  // state elements the step changed: the test cannot pass idle
      for (std::size_t i = 0; i < state.m.size(); ++i) {
        const float* now = state.m[i].data_as<float>();
        const float* was = before[i * (with_v ? 2 : 1)].tensor.view().data_as<float>();
        for (std::size_t e = 0; e < state.m[i].numel(); ++e)
          moved += fresh ? now[e] != 0.0f : now[e] != was[e];
      }
      CHECK(moved > 1000);

      for (const std::size_t chunk : {std::size_t{8} << 20, std::size_t{1000}}) {
        for (const std::size_t threads : {1, 3}) {
          CAPTURE(chunk);
          CAPTURE(threads);
          const ef::ScopedNumThreads scoped(threads);
          ef::WriteOptions wo;
          wo.chunk_bytes = chunk;  // 1000 bytes: pieces that split rows
          wo.replace_existing = true;
          ef::CheckpointWriter w(f.dir / "round", wo);
          w.add_group("server_state", {{"format", "pt"}});
          const auto prev = previous_state(f.layout, with_v);
          auto agg = round_of(f, step);
          agg.finalize_to(w, target, fresh ? ef::NamedViews{} : ef::views_of(prev), "server_state");
          w.commit();
          const auto model = ef::Checkpoint::open(f.dir / "round");
          const auto st = ef::Checkpoint::open(f.dir / "round" / "server_state.safetensors");
          CHECK(st.size() == f.layout.tensors().size() * (with_v ? 2 : 1));
          for (std::size_t i = 0; i < f.layout.tensors().size(); ++i) {
            const auto& name = f.layout.tensors()[i].meta.name;
            CAPTURE(name);
            CHECK(bytes(model.view(name)) == bytes(out[i]));
            CHECK(bytes(st.view(ef::server_state_name(name, 'm'))) == bytes(state.m[i]));
            if (with_v) {
              CHECK(bytes(st.view(ef::server_state_name(name, 'v'))) == bytes(state.v[i]));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("compute_rows takes the server step on the rows' state as finalize does") {
  ef::test::Fixture f;
  const ef::NamedViews target = ef::views_of(f.ckpt);
  ef::ServerStep step;
  step.rule = ef::ServerRule::kFedYogi;
  step.lr = 0.2f;
  auto state = previous_state(f.layout, true);
  std::vector<ef::NamedTensor> want;
  ef::ServerState mem;
  std::vector<ef::TensorView> out;
  for (std::size_t i = 0; i < f.layout.tensors().size(); ++i) {
    const auto& meta = f.layout.tensors()[i].meta;
    want.push_back({meta.name, ef::Tensor::empty(meta.dtype, meta.shape)});
    out.push_back(want.back().tensor.view());
    mem.m.push_back(state[2 * i].tensor.view());
    mem.v.push_back(state[2 * i + 1].tensor.view());
  }
  round_of(f, step).finalize(target, out, mem);
  // Rows in two calls per tensor, the state of those rows in buffers of their own.
  const auto fresh = previous_state(f.layout, true);
  auto agg = round_of(f, step);
  for (std::size_t i = 0; i < f.layout.tensors().size(); ++i) {
    const auto& meta = f.layout.tensors()[i].meta;
    CAPTURE(meta.name);
    const std::uint64_t rows = meta.shape.rank() < 2 ? 1 : meta.shape[0];
    const std::uint64_t row_len = meta.shape.numel() / rows;
    const auto esize = ef::dtype_bytes(meta.dtype, 1);
    const auto base = f.ckpt.view(meta.name);
    std::vector<std::byte> got(base.nbytes());
    std::vector<float> m(meta.shape.numel()), v(meta.shape.numel());
    std::memcpy(m.data(), fresh[2 * i].tensor.view().bytes(), m.size() * 4);
    std::memcpy(v.data(), fresh[2 * i + 1].tensor.view().bytes(), v.size() * 4);
    const std::uint64_t mid = rows / 3;
    for (const auto& [r0, r1] : {std::pair{std::uint64_t{0}, mid}, std::pair{mid, rows}}) {
      agg.compute_rows(i, base.bytes() + r0 * row_len * esize, r0, r1,
                       got.data() + r0 * row_len * esize, m.data() + r0 * row_len,
                       v.data() + r0 * row_len);
    }
    CHECK(std::memcmp(got.data(), out[i].bytes(), got.size()) == 0);
    CHECK(std::memcmp(m.data(), mem.m[i].bytes(), m.size() * 4) == 0);
    CHECK(std::memcmp(v.data(), mem.v[i].bytes(), v.size() * 4) == 0);
  }
  const auto& w0 = f.layout.tensors()[0].meta;
  std::vector<std::byte> row(ef::dtype_bytes(w0.dtype, w0.shape.numel()));
  std::vector<float> m(w0.shape.numel());
  CHECK_THROWS_WITH_AS(agg.compute_rows(0, row.data(), 0, 1, row.data(), m.data(), nullptr),
                       ("compute_rows: tensor '" + w0.name +
                        "' needs m_rows and v_rows for the server optimizer's state")
                           .c_str(),
                       ef::Error);
  CHECK_THROWS_WITH_AS(agg.compute_rows(0, row.data(), 0, 1, row.data()),
                       "aggregate: a server optimizer's step needs the rows' state: "
                       "compute_rows(tensor, base_rows, r0, r1, out, m_rows, v_rows)",
                       ef::Error);
}

TEST_CASE(
    "a previous server state that does not fit the target is named before anything is written") {
  ef::test::Fixture f;
  const ef::NamedViews target = ef::views_of(f.ckpt);
  ef::ServerStep step;  // FedAdam: m and v
  const std::string first = f.layout.tensors()[0].meta.name;
  auto message = [&](std::vector<ef::NamedTensor> state) {
    ef::CheckpointWriter w(f.dir / "never");
    w.add_group("server_state", {});
    auto agg = round_of(f, step);
    try {
      agg.finalize_to(w, target, ef::views_of(state), "server_state");
    } catch (const ef::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto state = previous_state(f.layout, true);
  CHECK(message(std::move(state)) == "no error");
  auto missing = previous_state(f.layout, true);
  missing.erase(missing.begin() + 1);
  CHECK(message(std::move(missing)) == "server state: tensor '" + first + ".v' is missing");
  auto extra = previous_state(f.layout, true);
  extra.push_back({"stray.m", ef::Tensor::empty(ef::DType::kF32, {2})});
  CHECK(message(std::move(extra)) ==
        "server state: tensor 'stray.m' is not the state of a tensor of the target");
  auto dtype = previous_state(f.layout, true);
  dtype[0].tensor = ef::Tensor::empty(ef::DType::kBF16, f.layout.tensors()[0].meta.shape);
  CHECK(message(std::move(dtype)) == "server state: tensor '" + first + ".m' is BF16 " +
                                         f.layout.tensors()[0].meta.shape.to_string() +
                                         "; the state of '" + first + "' is F32 " +
                                         f.layout.tensors()[0].meta.shape.to_string());
  auto shape = previous_state(f.layout, true);
  shape[1].tensor = ef::Tensor::empty(ef::DType::kF32, {3});
  CHECK(message(std::move(shape)) == "server state: tensor '" + first +
                                         ".v' is F32 [3]; the state of '" + first + "' is F32 " +
                                         f.layout.tensors()[0].meta.shape.to_string());
  // FedAvgM keeps no v: a v tensor is extra.
  step.rule = ef::ServerRule::kFedAvgM;
  CHECK(message(previous_state(f.layout, true)) ==
        "server state: tensor '" + first +
            ".v' is not the state of a tensor of the target (this rule keeps no second moment)");
  CHECK(!fs::exists(f.dir / "never"));
}
#endif  // EDGEFUSE_CLI
