// Coverage-weighted aggregation of client updates (aggregate/aggregator.h): the public
// Aggregator, delegating to the round state, the client checks and the tile loop.
#include "edgefuse/aggregate/aggregator.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/io/checkpoint.h"
#include "src/aggregate/aggregator_impl.h"
#include "src/aggregate/client_checks.h"
#include "src/aggregate/row_shape.h"
#include "src/extract/client_views.h"
#include "src/lora/task_merge_rules.h"

namespace edgefuse {

using detail::fail;

namespace {

void check_task_merge(const TaskMergeAggregate& t, const AggregateOptions& options) {
  const char* name = task_merge_method_name(t.method);
  const detail::TaskMergeSpec spec = detail::task_merge_spec(t.method);
  if (spec.sparsify == detail::TaskMergeSpec::kBreadcrumbs ||
      spec.sparsify == detail::TaskMergeSpec::kDella) {
    fail("aggregate: the task merge '", name,
         "' is not streamed (full models take task_arithmetic, magnitude_prune, ties, "
         "dare_linear, dare_ties and their mergekit forms)");
  }
  if (options.finite_check != FiniteCheck::kOnAdd) {
    fail(
        "aggregate: a task merge needs FiniteCheck::kOnAdd (values are gathered as they are, so "
        "a NaN could not be told from an element the client does not cover)");
  }
  if (options.robust || options.selection) {
    fail(
        "aggregate: a task merge is its own rule; it does not take a robust aggregate or a "
        "client selection");
  }
  if (!(t.options.density > 0.0 && t.options.density <= 1.0)) {
    fail("aggregate: the task merge '", name, "' has density ", t.options.density,
         ", outside (0, 1]");
  }
  if (t.options.masks != nullptr) {
    fail("aggregate: a streamed task merge draws its DARE masks; it takes no explicit masks");
  }
}

}  // namespace

Aggregator::Aggregator(ModelLayout target, AggregateOptions options)
    : impl_(std::make_unique<Impl>(std::move(target), options)) {
  if (!(options.server_lr - options.server_lr == 0.0f)) {
    fail("aggregate: server_lr = ", options.server_lr, " is not finite");
  }
  if (options.mode != AggregateMode::kParams && options.mode != AggregateMode::kDelta) {
    fail("aggregate: unknown mode ", static_cast<int>(options.mode));
  }
  if (options.server) {
    if (options.finite_check != FiniteCheck::kOnAdd) {
      fail(
          "aggregate: a server optimizer needs FiniteCheck::kOnAdd (its state is updated in "
          "place, so a round cannot be computed again without a client)");
    }
    impl_->opt.server->delta = options.mode == AggregateMode::kDelta;
    float* none = nullptr;
    server_step(none, none, none, none, none, none, 0, *impl_->opt.server);  // checks the rule
  }
  if (options.selection) {
    if (options.finite_check != FiniteCheck::kOnAdd) {
      fail(
          "aggregate: a client selection needs FiniteCheck::kOnAdd (its distances read every "
          "value before the round)");
    }
    if (options.selection->rule == SelectionRule::kBulyan && options.robust) {
      fail(
          "aggregate: Bulyan has its own coordinate-wise rule; it does not take a robust "
          "aggregate");
    }
    if (options.selection->rule == SelectionRule::kMultiKrum && options.selection->m == 0) {
      fail("multi_krum: m = 0 selects no client");
    }
  }
  if (const auto& c = options.clip) {
    if (options.mode != AggregateMode::kDelta) {
      fail("aggregate: clipping needs AggregateMode::kDelta (it bounds the norms of updates)");
    }
    if (options.finite_check != FiniteCheck::kOnAdd) {
      fail(
          "aggregate: clipping needs FiniteCheck::kOnAdd (its norms read every value before "
          "the round)");
    }
    if (!(c->norm > 0.0) || !std::isfinite(c->norm)) {
      fail("aggregate: the clip norm ", c->norm, " must be > 0 and finite");
    }
    if (!(c->noise_multiplier >= 0.0) || !std::isfinite(c->noise_multiplier)) {
      fail("aggregate: the noise multiplier ", c->noise_multiplier, " must be >= 0 and finite");
    }
  }
  if (options.robust) {
    if (options.finite_check != FiniteCheck::kOnAdd) {
      fail(
          "aggregate: a robust aggregate needs FiniteCheck::kOnAdd (values are gathered as they "
          "are, so a NaN could not be told from an element the client does not cover)");
    }
    const RobustAggregate& r = *options.robust;
    if (r.rule != RobustRule::kMedian && r.rule != RobustRule::kTrimmedMean) {
      fail("aggregate: unknown robust rule ", static_cast<int>(r.rule));
    }
    if (r.rule == RobustRule::kTrimmedMean && !(r.beta >= 0.0 && r.beta < 0.5)) {
      fail("aggregate: the trimmed mean's beta = ", r.beta, " is outside [0, 0.5)");
    }
    if (r.weighted && r.rule != RobustRule::kMedian) {
      fail("aggregate: only the median has a weighted form");
    }
  }
  if (const auto& t = options.task_merge) check_task_merge(*t, options);
  if (const auto& c = options.centered_clip) {
    if (options.mode != AggregateMode::kDelta || options.finite_check != FiniteCheck::kOnAdd) {
      fail(
          "aggregate: centered clipping needs AggregateMode::kDelta (it starts from the previous "
          "aggregate, a zero delta) and FiniteCheck::kOnAdd (its Gram matrix reads every value "
          "before the round)");
    }
    if (options.robust || options.selection || options.clip || options.task_merge) {
      fail(
          "aggregate: centered clipping is its own rule; it does not take a robust aggregate, a "
          "client selection, norm clipping or a task merge");
    }
    check_centered_clip_options(*c);
  }
}
Aggregator::Aggregator(Aggregator&&) noexcept = default;
Aggregator& Aggregator::operator=(Aggregator&&) noexcept = default;
Aggregator::~Aggregator() = default;

std::size_t Aggregator::num_clients() const noexcept {
  return impl_->clients.size() + impl_->low_rank.size();
}
const ModelLayout& Aggregator::layout() const noexcept { return impl_->layout; }
const std::vector<TensorCoverage>& Aggregator::report() const noexcept {
  return impl_->report.tensors();
}
const ClientStatistics* Aggregator::statistics() const noexcept {
  return impl_->selection ? &impl_->statistics : nullptr;
}

const SelectionResult* Aggregator::selection() const noexcept {
  return impl_->selection ? &*impl_->selection : nullptr;
}

const ClipResult* Aggregator::clipping() const noexcept {
  return impl_->clipping ? &*impl_->clipping : nullptr;
}

const CenteredClipResult* Aggregator::centered_clipping() const noexcept {
  return impl_->centered ? &*impl_->centered : nullptr;
}

const std::vector<std::string>& Aggregator::rejected() const noexcept { return impl_->rejected; }

std::uint64_t Aggregator::resident_bytes() const noexcept {
  return impl_->memory.total(impl_->clients.size(), num_threads());
}

void Aggregator::add(NamedViews update, Plan plan, float weight, std::string label) {
  const ModelLayout& layout = impl_->layout;
  detail::check_client_weight(weight, label);
  validate_plan(plan, layout, label + ": plan");
  detail::SubModelClient c{
      label, weight, plan, std::make_shared<const detail::PlanLists>(layout, plan),
      {},    {},     {},   false};
  c.local.resize(layout.tensors().size());
  c.holds.assign(layout.tensors().size(), 0);
  const auto tensors = detail::client_tensors(layout, *c.lists, std::nullopt);
  c.pending = detail::take_update(layout, update, tensors,
                                  impl_->opt.finite_check == FiniteCheck::kWhileFusing, c);
  impl_->memory.add_sub_model_client(layout, c, tensors);
  impl_->clients.push_back(std::move(c));
  impl_->shares.forget_sub_model();  // they point at clients, which may have moved
}

void Aggregator::add_rows(Plan plan, float weight, std::string label, LocalRowSource rows) {
  const ModelLayout& layout = impl_->layout;
  detail::check_client_weight(weight, label);
  if (!rows) fail(label, ": no row source given");
  validate_plan(plan, layout, label + ": plan");
  detail::SubModelClient c{
      label, weight,          plan, std::make_shared<const detail::PlanLists>(layout, plan), {},
      {},    std::move(rows), false};
  c.local.resize(layout.tensors().size());
  c.holds.assign(layout.tensors().size(), 0);
  const auto tensors = detail::client_tensors(layout, *c.lists, std::nullopt);
  for (const auto& ct : tensors) {
    if (detail::is_aggregatable(layout.tensors()[ct.target_index].meta.dtype)) {
      c.holds[ct.target_index] = 1;
    }
  }
  impl_->memory.add_sub_model_client(layout, c, tensors);
  impl_->clients.push_back(std::move(c));
  impl_->shares.forget_sub_model();  // they point at clients, which may have moved
}

void Aggregator::add_low_rank(std::vector<LowRankDelta> deltas, float weight, std::string label) {
  detail::check_low_rank_client(impl_->opt.mode, weight, label);
  detail::LowRankClient c{label, weight, {}, {}, {}};
  std::uint64_t bytes = sizeof(detail::LowRankClient) + label.size();
  for (auto& d : deltas) {
    const std::size_t ti = impl_->low_rank_tensor(d.tensor, label);
    for (const auto& other : c.deltas) {
      if (other.tensor == ti)
        fail(label, ": tensor '", d.tensor, "' given twice (client rejected)");
    }
    c.deltas.push_back(detail::prepare_delta(std::move(d), impl_->layout, ti, label));
    bytes += c.deltas.back().bytes();
  }
  impl_->low_rank.push_back(std::move(c));
  impl_->memory.add_kept(bytes);
  impl_->shares.forget_low_rank();
}

void Aggregator::add_low_rank(std::vector<std::string> tensors, float weight, std::string label,
                              LowRankSource make) {
  detail::check_low_rank_client(impl_->opt.mode, weight, label);
  if (!make) fail(label, ": no low-rank source given");
  detail::LowRankClient c{label, weight, {}, {}, std::move(make)};
  std::vector<std::uint64_t> bytes;
  for (auto& name : tensors) {
    const std::size_t ti = impl_->low_rank_tensor(name, label);
    for (const auto& other : c.made_on_demand) {
      if (other.first == ti) fail(label, ": tensor '", name, "' given twice (client rejected)");
    }
    LowRankDelta d = c.make(name);
    if (d.tensor != name)
      fail(label, ": asked for tensor '", name, "' the source made '", d.tensor, "'");
    bytes.push_back(detail::prepare_delta(std::move(d), impl_->layout, ti, label).bytes());
    c.made_on_demand.emplace_back(ti, std::move(name));
  }
  for (std::size_t k = 0; k < c.made_on_demand.size(); ++k) {
    impl_->memory.add_while_computing(c.made_on_demand[k].first, bytes[k]);
  }
  impl_->memory.add_kept(sizeof(detail::LowRankClient) + c.label.size() +
                         c.made_on_demand.size() * 48);
  impl_->low_rank.push_back(std::move(c));
  impl_->shares.forget_low_rank();
}

void Aggregator::compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                              std::uint64_t r1, std::byte* out) {
  if (impl_->opt.server) {
    fail(
        "aggregate: a server optimizer's step needs the rows' state: compute_rows(tensor, "
        "base_rows, r0, r1, out, m_rows, v_rows)");
  }
  compute_rows(tensor, base_rows, r0, r1, out, nullptr, nullptr);
}

void Aggregator::compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                              std::uint64_t r1, std::byte* out, float* m_rows, float* v_rows) {
  const std::optional<ServerStep>& server = impl_->opt.server;
  if (!server && (m_rows != nullptr || v_rows != nullptr)) {
    fail("aggregate: state rows were given but no server optimizer");
  }
  impl_->check_pending();  // rows given out cannot be computed again
  impl_->check_ready();
  impl_->apply_client_rules();
  const auto& tensors = impl_->layout.tensors();
  if (tensor >= tensors.size()) fail("compute_rows: tensor ", tensor, " of ", tensors.size());
  const detail::RowShape rs = detail::row_shape(tensors[tensor].meta.shape);
  if (r0 > r1 || r1 > rs.rows) {
    fail("compute_rows: rows [", r0, ", ", r1, ") of '", tensors[tensor].meta.name, "' with ",
         rs.rows, " rows");
  }
  if (r0 == r1) return;
  if (base_rows == nullptr || out == nullptr) fail("compute_rows: null rows");
  if (server && detail::is_aggregatable(tensors[tensor].meta.dtype) &&
      (m_rows == nullptr || (v_rows == nullptr) == server_rule_has_v(server->rule))) {
    fail("compute_rows: tensor '", tensors[tensor].meta.name, "' needs m_rows",
         server_rule_has_v(server->rule) ? " and v_rows" : " and no v_rows",
         " for the server optimizer's state");
  }
  if (impl_->report.empty()) impl_->report.reset(impl_->layout);
  const detail::RowShape whole = detail::row_shape(tensors[tensor].meta.shape);
  impl_->compute(tensor, base_rows, r0, r1, out, r0,
                 r0 == 0 && r1 == whole.rows ? base_rows : nullptr, m_rows, v_rows);
}

std::vector<TensorCoverage> Aggregator::finalize(const NamedViews& target,
                                                 const std::vector<TensorView>& out) {
  impl_->check_ready();
  impl_->apply_client_rules();
  const ModelLayout& layout = impl_->layout;
  if (out.size() != layout.tensors().size()) {
    fail("aggregate: ", out.size(), " output views for ", layout.tensors().size(), " tensors");
  }
  const auto by_name = detail::index_views(target);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const auto& t = layout.tensors()[i];
    detail::find_target(by_name, t);
    if (out[i].shape() != t.meta.shape || out[i].dtype() != t.meta.dtype) {
      fail("aggregate: output view ", i, " for '", t.meta.name, "' is ", dtype_name(out[i].dtype()),
           " ", out[i].shape().to_string(), ", expected ", dtype_name(t.meta.dtype), " ",
           t.meta.shape.to_string());
    }
  }
  std::vector<const ConstTensorView*> bases(out.size());
  bool in_place = false;
  for (std::size_t i = 0; i < out.size(); ++i) {
    bases[i] = &detail::find_target(by_name, layout.tensors()[i]);
    const std::byte* b = bases[i]->bytes();
    const std::byte* o = out[i].bytes();
    const auto len = static_cast<std::size_t>(dtype_bytes(out[i].dtype(), out[i].numel()));
    in_place = in_place || (len > 0 && o < b + len && b < o + len);
  }
  if (in_place) {  // the target's own values are overwritten: no second pass possible
    impl_->check_pending();
    impl_->check_ready();
    impl_->apply_client_rules();
  }
  // With pending clients (kWhileFusing) a pass that finalised a NaN or Inf result is done
  // again without the clients that caused it; the second pass has no pending client left.
  for (;;) {
    impl_->report.reset(layout);
    impl_->saw_nonfinite.store(false);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto rows = detail::row_shape(bases[i]->shape()).rows;
      impl_->compute(i, bases[i]->bytes(), 0, rows, out[i].bytes(), 0, bases[i]->bytes());
    }
    impl_->shares.forget();
    if (!impl_->saw_nonfinite.load() || !impl_->any_pending()) break;
    // Without the clients that hold a NaN or Inf, or (none does) with every client checked,
    // so that a result that still does not fit is an error naming it.
    impl_->check_pending();
    impl_->check_ready();
    impl_->apply_client_rules();
  }
  // Every value of the clients still pending went into a sum that was finite: checked.
  for (auto& c : impl_->clients) c.pending = false;
  return impl_->report.tensors();
}

std::vector<TensorCoverage> Aggregator::finalize(const NamedViews& target,
                                                 const std::vector<TensorView>& out,
                                                 ServerState& state) {
  const ModelLayout& layout = impl_->layout;
  if (!impl_->opt.server) fail("aggregate: a server state was given but no server optimizer");
  const bool two = impl_->opt.server->rule != ServerRule::kFedAvgM &&
                   impl_->opt.server->rule != ServerRule::kNesterov;
  const std::size_t n = layout.tensors().size();
  if (state.m.size() != n || (two && state.v.size() != n)) {
    fail("aggregate: the server state has ", state.m.size(), " m and ", state.v.size(),
         " v views for ", n, " tensors");
  }
  for (std::size_t i = 0; i < n; ++i) {
    const auto& meta = layout.tensors()[i].meta;
    const bool floats = detail::is_aggregatable(meta.dtype);
    for (const auto* views : {&state.m, two ? &state.v : nullptr}) {
      if (views == nullptr) continue;
      const TensorView& s = (*views)[i];
      const char* which = views == &state.m ? "m" : "v";
      if (floats ? (s.dtype() != DType::kF32 || s.shape() != meta.shape)
                 : (s.bytes() != nullptr && s.numel() != 0)) {
        fail("aggregate: server state ", which, " of tensor '", meta.name, "' is ",
             dtype_name(s.dtype()), " ", s.shape().to_string(), "; expected ",
             floats ? "F32 " + meta.shape.to_string() : std::string("an empty view"));
      }
    }
  }
  impl_->server_state = &state;
  try {
    auto report = finalize(target, out);
    impl_->server_state = nullptr;
    return report;
  } catch (...) {
    impl_->server_state = nullptr;
    throw;
  }
}

std::vector<NamedTensor> Aggregator::finalize(const NamedViews& target,
                                              std::vector<TensorCoverage>* report) {
  std::vector<NamedTensor> out;
  std::vector<TensorView> views;
  for (const auto& t : impl_->layout.tensors()) {
    out.push_back({t.meta.name, Tensor::empty(t.meta.dtype, t.meta.shape)});
    views.push_back(out.back().tensor.view());
  }
  auto r = finalize(target, views);
  if (report) *report = std::move(r);
  return out;
}

void Aggregator::finalize_to(CheckpointWriter& writer, const NamedViews& target) {
  if (impl_->opt.server) {
    fail(
        "aggregate: a server optimizer's state needs finalize_to(writer, target, previous, "
        "state_group) or finalize(target, out, state)");
  }
  declare_on(writer, target, nullptr, "");
}

void Aggregator::finalize_to(CheckpointWriter& writer, const NamedViews& target,
                             const NamedViews& previous, const std::string& state_group) {
  if (!impl_->opt.server) fail("aggregate: a server state was given but no server optimizer");
  const ServerStateViews state =
      bind_server_state(impl_->layout, impl_->opt.server->rule, previous, "server state");
  declare_on(writer, target, &state, state_group);
}

void Aggregator::declare_on(CheckpointWriter& writer, const NamedViews& target,
                            const ServerStateViews* previous, const std::string& state_group) {
  impl_->check_pending();  // the writer's bytes cannot be computed again
  impl_->check_ready();
  impl_->apply_client_rules();
  const ModelLayout& layout = impl_->layout;
  const auto by_name = detail::index_views(target);
  for (const auto& t : layout.tensors()) detail::find_target(by_name, t);
  impl_->report.reset(layout);
  const bool has_v = previous != nullptr && server_rule_has_v(impl_->opt.server->rule);
  for (std::size_t i = 0; i < layout.tensors().size(); ++i) {
    const auto& t = layout.tensors()[i];
    const ConstTensorView base = detail::find_target(by_name, t);
    const std::uint64_t row_len = detail::row_shape(t.meta.shape).row_len;
    const std::size_t row_bytes = static_cast<std::size_t>(dtype_bytes(t.meta.dtype, row_len));
    // The state of this tensor: where the step starts from (empty: zeros) and its new names.
    struct State {
      bool on = false;
      ConstTensorView m, v;
      std::string m_name, v_name;
    };
    State st;
    if (previous != nullptr && detail::is_aggregatable(t.meta.dtype)) {
      st = {true, previous->m[i], has_v ? previous->v[i] : ConstTensorView(),
            server_state_name(t.meta.name, 'm'), has_v ? server_state_name(t.meta.name, 'v') : ""};
    }
    Impl* impl = impl_.get();
    CheckpointWriter* w = &writer;
    auto watermark = std::make_shared<std::uint64_t>(0);
    auto scratch = std::make_shared<std::vector<std::byte>>();
    auto state_rows = std::make_shared<std::vector<float>>();
    auto produce = [impl, w, i, base, row_len, row_bytes, st, watermark, scratch, state_rows](
                       std::uint64_t offset, std::byte* dst, std::size_t len) {
      if (row_bytes == 0 || len == 0) return;
      const std::uint64_t r0 = offset / row_bytes;
      const std::uint64_t r1 = (offset + len + row_bytes - 1) / row_bytes;
      // The rows' state: read from the previous state (never written), so rows computed twice
      // (pieces that split a row) take the same step.
      float* m = nullptr;
      float* v = nullptr;
      const std::size_t n = static_cast<std::size_t>((r1 - r0) * row_len);
      if (st.on) {
        state_rows->resize(st.v_name.empty() ? n : 2 * n);
        m = state_rows->data();
        v = st.v_name.empty() ? nullptr : m + n;
        for (const auto& [rows, from] : {std::pair{m, &st.m}, std::pair{v, &st.v}}) {
          if (rows == nullptr) continue;
          if (from->bytes() == nullptr) {  // no previous state: zeros
            std::memset(rows, 0, n * sizeof(float));
          } else {
            std::memcpy(rows, from->bytes() + r0 * row_len * sizeof(float), n * sizeof(float));
          }
        }
      }
      if (offset % row_bytes == 0 && len % row_bytes == 0) {
        impl->compute(i, base.bytes() + r0 * row_bytes, r0, r1, dst, *watermark, base.bytes(), m,
                      v);
      } else {
        scratch->resize(static_cast<std::size_t>((r1 - r0) * row_bytes));
        impl->compute(i, base.bytes() + r0 * row_bytes, r0, r1, scratch->data(), *watermark,
                      base.bytes(), m, v);
        std::memcpy(dst, scratch->data() + (offset - r0 * row_bytes), len);
      }
      *watermark = std::max(*watermark, r1);
      if (m != nullptr) {
        w->write_linked(st.m_name, r0 * row_len * sizeof(float),
                        reinterpret_cast<const std::byte*>(m), n * sizeof(float));
      }
      if (v != nullptr) {
        w->write_linked(st.v_name, r0 * row_len * sizeof(float),
                        reinterpret_cast<const std::byte*>(v), n * sizeof(float));
      }
      if (offset + len == base.nbytes()) {  // the last piece: the buffers go with the tensor
        std::vector<std::byte>().swap(*scratch);
        std::vector<float>().swap(*state_rows);
      }
    };
    writer.add(t.meta.name, t.meta.dtype, t.meta.shape, std::move(produce));
    if (st.on) {
      writer.add_linked(st.m_name, DType::kF32, t.meta.shape, t.meta.name, state_group);
      if (has_v) writer.add_linked(st.v_name, DType::kF32, t.meta.shape, t.meta.name, state_group);
    }
  }
}

}  // namespace edgefuse
