// edgefuse/aggregate/options.h — how an Aggregator fuses: the mode, the server learning rate,
// when client values are checked, and the tile size.
#pragma once

#include <cstddef>
#include <optional>

#include "edgefuse/aggregate/clipping.h"
#include "edgefuse/aggregate/selection.h"
#include "edgefuse/kernels/robust_reduce.h"
#include "edgefuse/kernels/server_step.h"

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
};

}  // namespace edgefuse
