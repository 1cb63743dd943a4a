// edgefuse/aggregate/options.h — how an Aggregator fuses: the mode, the server learning rate,
// when client values are checked, and the tile size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "edgefuse/aggregate/centered_clip.h"
#include "edgefuse/aggregate/clipping.h"
#include "edgefuse/aggregate/selection.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "edgefuse/kernels/server_step.h"
#include "edgefuse/lora/task_merge.h"

namespace edgefuse {

// kParams: clients send their weights, W_new[e] = the weighted mean of their values.
// kDelta:  clients send W_client - W, W_new[e] = W[e] + server_lr * the weighted mean delta.
enum class AggregateMode { kParams, kDelta };

// When add() clients' values are checked for NaN and +-Inf (every value of every update is,
// and a client holding one is rejected with its label, tensor and element named; the others
// are still fused):
//   kOnAdd:       add() scans the update and throws Error for such a client. Each update is
//                 read twice: once by add(), once by finalize.
//   kWhileFusing: add() checks names, shapes and dtypes only; finalize() checks the values
//                 as it adds them, so each update is read once. A NaN or Inf value leaves
//                 its element's f32 sum NaN or Inf, and the sums are checked as they are
//                 finalised; when one is, every client not checked yet is scanned as add()
//                 would scan it, the ones holding such a value are dropped (their add()
//                 message goes to rejected()) and the round is computed again without them.
//                 A bad client so costs one more pass, never a wrong result. Paths that
//                 cannot compute again scan the clients not checked yet before they write:
//                 finalize_to(), compute_rows(), and finalize() with out[i] overlapping
//                 target[i] (in place). A client with weight 0 or with "aggregate_only"
//                 rows (values finalize never reads) is scanned by add() as in kOnAdd.
enum class FiniteCheck { kOnAdd, kWhileFusing };

// A robust aggregate in place of the weighted mean (kernels/robust_reduce.h): per element, over
// the clients that cover it (their number may differ from element to element), the
// coordinate-wise median or the trimmed mean (floor(beta * c) values dropped from each end) of
// their values: deltas in kDelta mode, weights in kParams mode. Unweighted, as Flower's
// FedMedian and FedTrimmedAvg: client weights do not enter, unless `weighted` (the median
// only: kernels/robust_reduce.h weighted_median). The result r stands where the
// weighted mean stood: W + server_lr * r (kDelta), r (kParams), or the server optimizer's
// pseudo-gradient.
struct RobustAggregate {
  RobustRule rule = RobustRule::kMedian;
  double beta = 0.2;      // kTrimmedMean, in [0, 0.5)
  bool weighted = false;  // kMedian: the client-weighted median
};

// Merging full models by a task-merging rule (lora/task_merge.h) in place of the weighted mean,
// streamed: mergekit's ties (kMergekitTies), dare_linear and dare_ties, and the other methods
// that prune by magnitude or at random (task_arithmetic, magnitude_prune, PEFT's ties and DARE,
// mergekit_linear; not breadcrumbs or DELLA). A client's task vector is its delta (kDelta) or
// its weights minus the target, rounded to f32 as mergekit subtracts in f32 (kParams). Each
// client must cover the whole of every tensor it sends (full models; low-rank deltas count).
// Per tensor and client, before the tensor's tiles: magnitude pruning keeps the entries of the
// ⌊density·n⌋ largest |task value| (at least one for mergekit's methods), ties at the cut toward
// the lower flat index, found exactly by a three-level radix select over the f32 bit patterns
// (three streamed passes over the clients' values, a fourth when the cut falls inside a run of
// equal nonzero values); DARE keeps element i of tensor t of the round's k-th client (in the
// order added: sub-model clients, then low-rank ones) where dare_mask(n, density, seed, t, k)
// does, the masks of merge_tasks with stream key t; mergekit's L1 rescale takes
// one more pass. Each element then combines the clients' values with their weights exactly as
// merge_tasks does, in double. The result r stands where the weighted mean stood: W + server_lr
// * r (kDelta), W + r rounded to f32 as mergekit adds (kParams), or the server optimizer's
// pseudo-gradient. Needs FiniteCheck::kOnAdd; not with `robust` or `selection`.
struct TaskMergeAggregate {
  TaskMergeMethod method = TaskMergeMethod::kMergekitTies;
  // density, majority_sign, normalize, rescale and seed; masks must be null (stream_key, gamma,
  // epsilon and row_len are not used).
  TaskMergeOptions options;
};

// The memory a task merge's passes hold while they run, beyond the clients' own data: each
// thread's tile of one client's values and of the target, and the histograms of the items
// computed together (about 1.3 MiB with 2 threads). For a memory budget.
std::uint64_t task_merge_pass_bytes(std::size_t threads) noexcept;

struct AggregateOptions {
  AggregateMode mode = AggregateMode::kParams;
  float server_lr = 1.0f;  // delta mode only
  // Elements per tile buffer (tile_bytes_per_element() bytes each, one buffer per thread;
  // aggregate/tile_memory.h). 0 = kMaxTileElements.
  std::size_t tile_elements = 0;
  // Exact tile height in rows (0 = from tile_elements). For tests of tile invariance.
  std::size_t tile_rows = 0;
  // Count contributors per element for the coverage report (one more u32 stream per tile).
  bool coverage_counts = true;
  FiniteCheck finite_check = FiniteCheck::kOnAdd;
  // A server optimizer instead of the plain mean (kernels/server_step.h): each covered
  // element takes the rule's step on the pseudo-gradient (the mean delta, or in params mode
  // the mean weight minus the target), with per-element state given to finalize(); server_lr
  // is not used (the step has its own lr) and step.delta follows `mode`. Needs
  // FiniteCheck::kOnAdd, since the state is updated in place and a round cannot be computed
  // again.
  std::optional<ServerStep> server;
  // A robust aggregate instead of the weighted mean (above). Needs FiniteCheck::kOnAdd (a
  // value is gathered as it is, so a NaN could not be told from an uncovered element). Each
  // tile holds every covering client's values, 4 bytes each: its rows are cut so that a
  // thread's buffers stay within tile_elements x tile_bytes_per_element(false) bytes.
  std::optional<RobustAggregate> robust;
  // Krum, Multi-Krum or Bulyan (aggregate/selection.h): before the round is computed, one pass
  // over the clients' values gives their distances, and the clients not selected take no part
  // (Aggregator::selection() tells which). Multi-Krum fuses the selected by the weighted mean
  // (or `robust`); Bulyan by its own coordinate rule (not with `robust`). Needs
  // FiniteCheck::kOnAdd.
  std::optional<ClientSelection> selection;
  // Norm clipping, with DP-FedAvg's noise when noise_multiplier > 0 (aggregate/clipping.h):
  // before the round is computed, one pass over the clients' values gives their norms; each
  // client's values then count times its factor (in the distances of `selection` too), and
  // the noise is added to each covered element's fused value. Needs AggregateMode::kDelta and
  // FiniteCheck::kOnAdd.
  std::optional<ClipOptions> clip;
  // A full-model task merge instead of the weighted mean (above).
  std::optional<TaskMergeAggregate> task_merge;
  // Centered clipping (aggregate/centered_clip.h) instead of the weighted mean: before the
  // round is computed, one pass over the clients' values gives their Gram matrix; each client
  // then takes part with weight a_j (its coefficient, in f32) and its values count times
  // s = Σ a_j. Needs AggregateMode::kDelta and FiniteCheck::kOnAdd; not with `robust`,
  // `selection`, `clip` or `task_merge`.
  std::optional<CenteredClipOptions> centered_clip;
};

}  // namespace edgefuse
