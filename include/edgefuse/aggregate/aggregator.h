// edgefuse/aggregate/aggregator.h — scatter client updates back into the target by coverage.
//
// HeteroFL's `combine` (Diao et al., ICLR 2021), FedRolex's (Alam et al., NeurIPS 2022),
// FjORD's nested average (Horvath et al., NeurIPS 2021) and DepthFL's per-layer mean are one
// rule: for every target element e,
//   params mode: W_new[e] = sum_{m covers e} a_m L_m[e] / sum_{m covers e} a_m
//   delta mode:  W_new[e] = W_old[e] + lr * sum a_m D_m[e] / sum a_m
// over the clients m whose plan covers e, with a_m the client weight (1, or a sample count as
// in FjORD) and lr a server learning rate (FIARSE); elements no client covers keep their
// value bit for bit. Aggregation only counts the elements a plan's "aggregate_only" keeps
// (HeteroFL's rule for the token rows a client saw).
//
// Overflow: sums are f32. A tile where a result is NaN, Inf or outside the output dtype's range
// (a sum of large finite values at large weights, a server learning rate that sends the update
// past the range, a bf16 or f16 target whose mean leaves its range) is summed again with the
// weights scaled by a power of two that brings their total to at most 1 (a weighted sum of
// finite values then stays within the range of its largest value), and those elements are
// computed again in double. So a finite mean stays finite; a result that still does not fit
// the output dtype is an Error naming the tensor and element, never a silent Inf. Elements
// that did not overflow keep their bits.
//
// Memory is bounded: target tensors are computed in tiles of rows, each tile visiting only
// the clients whose rows land in it, with fp32 sums in a per-thread buffer of about
// `tile_elements` elements; the target and updates are read through their views (mmap for
// checkpoints), and finalize_to() streams the result into the atomic checkpoint writer. Every
// element sums its clients in the order they were added, so the result is bitwise identical
// for any tile size and thread count.
//
//   edgefuse::Aggregator agg(layout, {edgefuse::AggregateMode::kDelta});
//   agg.add(edgefuse::views_of(update_ckpt), plan, 1.0f, "client0.safetensors");
//   edgefuse::CheckpointWriter w("fused");
//   agg.finalize_to(w, edgefuse::views_of(target_ckpt));
//   w.commit();
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "edgefuse/aggregate/coverage.h"
#include "edgefuse/aggregate/low_rank.h"
#include "edgefuse/aggregate/options.h"
#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/extract/extract.h"

namespace edgefuse {

// Writes client-local rows on demand: for layout tensor `tensor`, the `n` local rows listed
// (client-local row indices, in the order given), each `row_len` F32 values, into dst (n *
// row_len). A tensor of rank < 2 is one row. Must be thread-safe (tiles run in parallel) and give
// the same values whenever it is asked.
using LocalRowSource = std::function<void(std::size_t tensor, const std::uint32_t* local_rows,
                                          std::size_t n, std::size_t row_len, float* dst)>;

class Aggregator {
 public:
  explicit Aggregator(ModelLayout target, AggregateOptions options = {});
  Aggregator(Aggregator&&) noexcept;
  Aggregator& operator=(Aggregator&&) noexcept;
  ~Aggregator();

  // Registers one client: `update` must hold exactly the tensors client_tensors(layout,
  // plan) names, with those shapes, in F32, BF16 or F16 (non-float tensors in the target's
  // dtype), every value finite. The views must stay valid until finalize. Throws Error naming
  // `label`, the tensor and the rule broken (missing, extra, shape, dtype, non-finite value,
  // bad plan, weight negative or not finite); the aggregator is then unchanged, so the
  // remaining clients can still be fused. Reads every value once (the finiteness scan); with
  // FiniteCheck::kWhileFusing leaves that to finalize (see there).
  void add(NamedViews update, Plan plan, float weight, std::string label);
  // Registers a client whose update is low-rank deltas (delta mode only): for every element
  // a delta covers, weight·scale·(L·R)[e] joins the sum and weight the covering weight, after
  // the add() clients and in the order of add_low_rank calls, so results stay bitwise
  // independent of tiles and threads. Throws Error naming `label` (unknown tensor, shapes,
  // non-finite values, bad index lists, params mode); the aggregator is then unchanged.
  void add_low_rank(std::vector<LowRankDelta> deltas, float weight, std::string label);
  // The same for a client whose factors are not held between tensors: `tensors` names the
  // target tensors it updates and make(name) returns that tensor's delta. make is called once
  // per tensor now (each delta checked as above, measured for resident_bytes(), and dropped)
  // and once more when that tensor is computed, the result kept only while it is; so a round
  // holds one tensor's factors of every client instead of all of them. make must return the
  // same delta both times and may throw Error (the client is then rejected, or finalize fails
  // with nothing written); a delta that fails the checks when the tensor is computed throws
  // Error naming `label` from finalize.
  void add_low_rank(std::vector<std::string> tensors, float weight, std::string label,
                    LowRankSource make);
  // Registers a client whose update is never held in memory: each tile asks `rows` for the
  // local rows it needs (generated clients of `edgefuse simulate`, updates streamed from
  // elsewhere). The plan gives the shapes. Fused exactly as add() with the same values in
  // F32, in registration order among the add() clients. Values are not scanned for
  // finiteness (the source is trusted). Throws Error for a bad plan or weight.
  void add_rows(Plan plan, float weight, std::string label, LocalRowSource rows);

  std::size_t num_clients() const noexcept;
  // Bytes the registered clients keep in memory until finalize (plans and their index
  // lists, held low-rank factors) plus the most that one tensor's per-client state reaches
  // while it is computed (row and run lists, factors made on demand, and the temporaries of
  // building those lists, once per thread of num_threads() since clients' lists are built in
  // parallel) plus the lists kept per {layer} rule (a client's share of such a tensor is the
  // same in every layer, so it is built once per rule and kept until finalize returns): an
  // upper bound, counted as clients are added, for a caller that keeps a
  // memory budget. The tile buffers
  // (aggregate/tile_memory.h) and the inputs' mapped pages are not included.
  std::uint64_t resident_bytes() const noexcept;
  const ModelLayout& layout() const noexcept;

  // Computes every target tensor into `out` (one view per layout tensor, in layout order,
  // same dtype and shape as the target; out[i] may be target[i]'s own memory for an
  // in-place update). Returns the coverage report. Throws Error if no client was added, the
  // weights sum to zero (also after rejections), or a target tensor is missing or
  // mis-shaped; `out` then holds unspecified values (the target is untouched unless out
  // is its own memory).
  std::vector<TensorCoverage> finalize(const NamedViews& target,
                                       const std::vector<TensorView>& out);
  // With AggregateOptions::server (required there): the same, each covered element taking the
  // optimizer's step and its state in `state` updated (elements no client covers keep their value
  // and state bit for bit). Throws Error for state views of the wrong dtype or shape, and for a
  // step whose result is not finite in the output dtype (naming the tensor and element); `out` and
  // `state` then hold unspecified values.
  std::vector<TensorCoverage> finalize(const NamedViews& target, const std::vector<TensorView>& out,
                                       ServerState& state);
  // The same into new tensors.
  std::vector<NamedTensor> finalize(const NamedViews& target,
                                    std::vector<TensorCoverage>* report = nullptr);
  // Declares every target tensor on `writer` with a producer that computes it tile by tile
  // during writer.commit(); report() is complete once commit() returns. Not with
  // AggregateOptions::server (Error): see the next one.
  void finalize_to(CheckpointWriter& writer, const NamedViews& target);
  // With AggregateOptions::server (required): the same, and with each tensor that has state its
  // new state ("T.m", "T.v": aggregate/server_state.h) declared as tensors linked to it in the
  // writer's file group `state_group` (the caller adds the group, with its metadata), written as
  // the tensor is. `previous` is the state the step starts from (bind_server_state's rule; empty:
  // zeros). Throws Error for a previous state that does not fit (naming the tensor) before
  // declaring anything; during commit, for a step whose result is not finite.
  void finalize_to(CheckpointWriter& writer, const NamedViews& target, const NamedViews& previous,
                   const std::string& state_group);
  // Computes fused rows [r0, r1) of layout tensor `tensor` (rows along dim 0; rank < 2: one
  // row) into `out`, from the target's same rows at `base_rows`; both row-major in the
  // tensor's dtype, `out` may equal `base_rows`. For drivers that make target rows
  // themselves (a simulation, a custom sink). report() counts the rows of every call: give
  // each row once for a true coverage report. Not with AggregateOptions::server (Error): see the
  // next one.
  void compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                    std::uint64_t r1, std::byte* out);
  // With AggregateOptions::server (required): the same, m_rows (and v_rows where the rule keeps
  // a second moment; else null) holding rows [r0, r1) of the tensor's state as F32, row-major,
  // updated in place (they may not overlap the rows). Elements no client covers keep theirs.
  void compute_rows(std::size_t tensor, const std::byte* base_rows, std::uint64_t r0,
                    std::uint64_t r1, std::byte* out, float* m_rows, float* v_rows);
  const std::vector<TensorCoverage>& report() const noexcept;
  // With AggregateOptions::selection, once the round is computed (finalize, finalize_to or the
  // first compute_rows): the clients' whole-update statistics and the selection made from
  // them, clients indexed in fusion order (sub-model clients as added, then low-rank ones);
  // null before.
  const ClientStatistics* statistics() const noexcept;
  const SelectionResult* selection() const noexcept;
  // With AggregateOptions::clip, likewise: each client's norm and factor; null before.
  const ClipResult* clipping() const noexcept;
  // With AggregateOptions::centered_clip, likewise: each client's coefficient; null before.
  const CenteredClipResult* centered_clipping() const noexcept;
  // FiniteCheck::kWhileFusing: the add() error message of each client that finalize,
  // finalize_to or compute_rows dropped for a NaN or Inf value, in the order they were added
  // (empty with kOnAdd, where add() throws instead). Dropped clients leave num_clients().
  const std::vector<std::string>& rejected() const noexcept;

 private:
  struct Impl;
  // finalize_to's producers, with the previous state (null: no server optimizer).
  void declare_on(CheckpointWriter& writer, const NamedViews& target,
                  const ServerStateViews* previous, const std::string& state_group);
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgefuse
