// The state of an Aggregator round (src/aggregate/aggregator_impl.h).
#include "src/aggregate/aggregator_impl.h"

#include <cmath>
#include <cstring>

#include "edgefuse/core/error.h"
#include "src/aggregate/client_checks.h"
#include "src/aggregate/client_statistics.h"
#include "src/aggregate/row_shape.h"
#include "src/aggregate/tile_loop.h"
#include "src/extract/client_views.h"

namespace edgefuse {

using detail::fail;

void Aggregator::Impl::compute(std::size_t ti, const std::byte* base_rows, std::uint64_t r0,
                               std::uint64_t r1, std::byte* out, std::uint64_t stats_from_row,
                               const std::byte* whole_base, float* m_rows, float* v_rows) {
  const auto& t = layout.tensors()[ti];
  const auto row_len = detail::row_shape(t.meta.shape).row_len;
  if (!detail::is_aggregatable(t.meta.dtype)) {
    const auto row_bytes = dtype_bytes(t.meta.dtype, row_len);
    if (out != base_rows) std::memmove(out, base_rows, (r1 - r0) * row_bytes);
    return;
  }
  detail::TensorRows job{
      ti,
      &t.meta,
      &shares.of(ti, layout, clients, low_rank),
      &opt,
      detail::OverflowContext{&t.meta, opt.mode, opt.server_lr, any_pending(), &saw_nonfinite},
      detail::overflow_scale(total_weight())};
  if (opt.server) {
    job.server = &*opt.server;
    job.server_first = r0 * row_len;
    if (m_rows != nullptr) {
      job.server_m = m_rows;
      job.server_v = v_rows;
    } else if (server_state != nullptr) {
      job.server_m = server_state->m[ti].data_as<float>() + job.server_first;
      job.server_v = server_state->v.empty() || server_state->v[ti].bytes() == nullptr
                         ? nullptr
                         : server_state->v[ti].data_as<float>() + job.server_first;
    } else {
      fail("aggregate: a server optimizer's state goes through finalize(target, out, state)");
    }
  }
  if (opt.task_merge) job.task_merge = &task_merge_of(ti, whole_base);
  detail::compute_tensor_rows(job, base_rows, r0, r1, out, stats_from_row, report);
}

const detail::TensorTaskMerge& Aggregator::Impl::task_merge_of(std::size_t ti,
                                                               const std::byte* whole_base) {
  const std::lock_guard<std::mutex> lock(task_merges_mutex);
  if (task_merges.empty()) task_merges.resize(layout.tensors().size());
  if (!task_merges[ti]) {
    const auto& of = shares.of(ti, layout, clients, low_rank);
    std::vector<std::string> labels;
    for (const std::size_t o : shares.owners()) {
      labels.push_back(o < clients.size() ? clients[o].label : low_rank[o - clients.size()].label);
    }
    task_merges[ti] = std::make_unique<detail::TensorTaskMerge>(detail::plan_task_merge(
        *opt.task_merge, opt.mode == AggregateMode::kParams, ti, layout.tensors()[ti].meta, of,
        labels, shares.owners(), whole_base));
  }
  return *task_merges[ti];
}

double Aggregator::Impl::total_weight() const noexcept {
  double total = 0.0;
  for (const auto& c : clients) total += c.weight;
  for (const auto& c : low_rank) total += c.weight;
  return total;
}

bool Aggregator::Impl::any_pending() const noexcept {
  for (const auto& c : clients) {
    if (c.pending) return true;
  }
  return false;
}

void Aggregator::Impl::check_ready() const {
  const std::string after =
      rejected.empty()
          ? std::string()
          : detail::concat(" (after dropping ", rejected.size(),
                           " client(s) for non-finite values; the first: ", rejected[0], ")");
  if (clients.empty() && low_rank.empty()) fail("aggregate: no client update was added", after);
  if (!(total_weight() > 0)) fail("aggregate: the client weights are all zero", after);
}

void Aggregator::Impl::apply_client_rules() {
  if (client_rules_applied) return;
  client_rules_applied = true;
  if (const auto& c = opt.clip) {
    const ClientStatistics norms =
        detail::compute_client_statistics(layout, shares, clients, low_rank, false);
    ClipResult& r = clipping.emplace();
    r.labels = norms.labels;
    for (std::size_t k = 0; k < norms.size(); ++k) {
      const double norm = std::sqrt(norms.sum_squares[k]);
      const float factor = norm > c->norm ? static_cast<float>(c->norm / norm) : 1.0f;
      r.norms.push_back(norm);
      r.factors.push_back(factor);
      r.unclipped += factor == 1.0f && norm <= c->norm ? 1 : 0;
      if (k < clients.size()) {
        clients[k].clip = factor;
      } else {
        low_rank[k - clients.size()].clip = factor;
      }
    }
    shares.forget();  // low-rank shares hold the factors
  }
  if (const auto& cc = opt.centered_clip) apply_centered_clip(*cc);
  if (!opt.selection) return;
  statistics = detail::compute_client_statistics(layout, shares, clients, low_rank, true);
  selection = select_clients(statistics, *opt.selection);
  std::vector<char> keep(clients.size() + low_rank.size(), 0);
  for (const std::size_t k : selection->selected) keep[k] = 1;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (!keep[k]) clients[k].weight = 0.0f;
  }
  for (std::size_t k = 0; k < low_rank.size(); ++k) {
    if (!keep[clients.size() + k]) low_rank[k].weight = 0.0f;
  }
  shares.forget();  // built with the weights before
}

void Aggregator::Impl::apply_centered_clip(const CenteredClipOptions& options) {
  const ClientStatistics gram =
      detail::compute_client_statistics(layout, shares, clients, low_rank, false, true);
  std::vector<double> weights;
  for (const auto& c : clients) weights.push_back(c.weight);
  for (const auto& c : low_rank) weights.push_back(c.weight);
  CenteredClipResult& r =
      centered.emplace(centered_clip_coefficients(gram.pair_dots, weights, options));
  r.labels = gram.labels;
  // Weights a_j in f32, values times s = Σ a_j: the coverage mean is then Σ a_j·x_j.
  double sum = 0.0;
  for (const double a : r.coefficients) sum += static_cast<float>(a);
  const float s = static_cast<float>(sum);
  for (std::size_t k = 0; k < r.coefficients.size(); ++k) {
    const float a = static_cast<float>(r.coefficients[k]);
    if (k < clients.size()) {
      clients[k].weight = a;
      clients[k].clip = s;
    } else {
      low_rank[k - clients.size()].weight = a;
      low_rank[k - clients.size()].clip = s;
    }
  }
  shares.forget();  // built with the weights before
}

std::size_t Aggregator::Impl::check_pending() {
  std::vector<std::size_t> of;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (clients[k].pending) of.push_back(k);
  }
  // Each client's tensors in plan order, as add() scans them.
  std::vector<std::vector<ClientTensor>> tensors(of.size());
  std::vector<detail::ScanJob> jobs(of.size());
  for (std::size_t j = 0; j < of.size(); ++j) {
    const detail::SubModelClient& c = clients[of[j]];
    tensors[j] = detail::client_tensors(layout, *c.lists, std::nullopt);
    jobs[j].label = &c.label;
    for (const auto& ct : tensors[j])
      jobs[j].tensors.push_back({ct.name, &c.local[ct.target_index]});
  }
  if (jobs.empty()) return 0;
  const std::vector<std::string> fault = detail::nonfinite_faults(jobs);
  std::vector<char> drop(clients.size(), 0);
  std::size_t dropped = 0;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    detail::SubModelClient& c = clients[of[j]];
    c.pending = false;
    if (fault[j].empty()) continue;
    rejected.push_back(fault[j]);
    drop[of[j]] = 1;
    ++dropped;
  }
  if (dropped == 0) return 0;
  std::vector<detail::SubModelClient> kept;
  kept.reserve(clients.size() - dropped);
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (!drop[k]) kept.push_back(std::move(clients[k]));
  }
  clients = std::move(kept);
  shares.forget();  // the shares point at clients and are indexed by client
  return dropped;
}

std::size_t Aggregator::Impl::low_rank_tensor(const std::string& name,
                                              const std::string& label) const {
  const ModelLayout::Tensor* found = layout.find(name);
  if (found == nullptr) fail(label, ": tensor '", name, "' is not in the target (client rejected)");
  return static_cast<std::size_t>(found - layout.tensors().data());
}

}  // namespace edgefuse
