// Private: the state of an Aggregator round: its clients, the shares of the tensor being
// computed, the coverage report and the clients dropped for non-finite values.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/selection.h"
#include "src/aggregate/coverage_report.h"
#include "src/aggregate/low_rank_share.h"
#include "src/aggregate/resident_memory.h"
#include "src/aggregate/share_cache.h"
#include "src/aggregate/sub_model_share.h"
#include "src/aggregate/task_merge_pass.h"

namespace edgefuse {

struct Aggregator::Impl {
  ModelLayout layout;
  AggregateOptions opt;
  std::vector<detail::SubModelClient> clients;
  std::vector<detail::LowRankClient> low_rank;
  detail::CoverageReport report;
  std::vector<std::string> rejected;  // kWhileFusing: clients dropped for non-finite values
  // Set when a tile finalised a NaN or Inf sum (kWhileFusing: a pending client may hold one).
  std::atomic<bool> saw_nonfinite{false};
  detail::ShareCache shares;
  detail::ResidentMemory memory;
  // AggregateOptions::clip and selection, once applied: the norms and factors, the clients'
  // statistics and the selection.
  std::optional<ClipResult> clipping;
  ClientStatistics statistics;
  std::optional<SelectionResult> selection;
  std::optional<CenteredClipResult> centered;
  bool client_rules_applied = false;
  // AggregateOptions::task_merge: each tensor's plan, made the first time it is computed.
  std::vector<std::unique_ptr<detail::TensorTaskMerge>> task_merges;
  std::mutex task_merges_mutex;
  // While finalize(target, out, state) runs: the server optimizer's state.
  ServerState* server_state = nullptr;

  Impl(ModelLayout l, AggregateOptions o) : layout(std::move(l)), opt(o), memory(layout) {}

  // Rows [r0, r1) of layout tensor ti from the target's rows at base_rows; coverage
  // counted for rows >= stats_from_row. With a server optimizer, its state of those rows is
  // m_rows and v_rows, or (null) the same rows of *server_state. whole_base: the whole target
  // tensor when the caller has it (a task merge in params mode reads it), else null.
  void compute(std::size_t ti, const std::byte* base_rows, std::uint64_t r0, std::uint64_t r1,
               std::byte* out, std::uint64_t stats_from_row, const std::byte* whole_base,
               float* m_rows = nullptr, float* v_rows = nullptr);
  // The task merge plan of tensor ti (made once).
  const detail::TensorTaskMerge& task_merge_of(std::size_t ti, const std::byte* whole_base);
  // Throws Error when there is no client or the weights sum to zero.
  void check_ready() const;
  // The first time: with AggregateOptions::clip, a statistics pass for the norms and each
  // client's clip factor; with AggregateOptions::selection, a statistics pass (of the clipped
  // values) with the pairs, the selection, and weight 0 for the clients not selected (they
  // then take no part).
  void apply_client_rules();
  // AggregateOptions::centered_clip: the Gram pass, the coefficients, and each client's
  // weight a_j and value factor Σ a_j.
  void apply_centered_clip(const CenteredClipOptions& options);
  // Scans the pending clients (kWhileFusing), drops those holding a NaN or Inf value (their
  // messages into `rejected`) and marks the rest checked; returns how many it dropped.
  std::size_t check_pending();
  bool any_pending() const noexcept;
  double total_weight() const noexcept;
  // The layout index of a low-rank delta's tensor; throws Error naming client `label`.
  std::size_t low_rank_tensor(const std::string& name, const std::string& label) const;
};

}  // namespace edgefuse
