// Private: a low-rank client (LoRA factors lifted into the target) and its share of one
// target tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "edgefuse/aggregate/low_rank.h"
#include "edgefuse/plan/schema.h"
#include "src/aggregate/share.h"

namespace edgefuse::detail {

// A low-rank delta checked and laid out for the tile loop: R is cut into one block per run
// of consecutive covered columns (rank x len each, row-major), so every (row run, column run)
// pair is one lora_update on the tile.
struct ColumnRun {
  std::uint32_t c0, len;
  std::size_t r_offset;  // of the run's block in PreparedDelta::r
};
struct PreparedDelta {
  std::size_t tensor = 0;  // layout index
  std::size_t rank = 0;
  float scale = 1.0f;
  std::vector<std::uint32_t> rows;  // covered target rows, sorted; empty = all
  std::vector<float> l;             // one row of `rank` values per covered row
  std::vector<ColumnRun> col_runs;
  std::vector<float> r;
  std::uint64_t bytes() const noexcept {
    return sizeof(PreparedDelta) + 4 * (rows.size() + l.size() + r.size()) +
           sizeof(ColumnRun) * col_runs.size();
  }
};

// Checks a delta against layout tensor `ti` and lays it out; throws Error naming `label`.
PreparedDelta prepare_delta(LowRankDelta d, const ModelLayout& layout, std::size_t ti,
                            const std::string& label);

// A low-rank client: deltas given whole (add_low_rank with deltas) or made per tensor (with a
// source).
struct LowRankClient {
  std::string label;
  float weight = 0.0f;
  std::vector<PreparedDelta> deltas;  // given to add_low_rank, kept until finalize
  std::vector<std::pair<std::size_t, std::string>> made_on_demand;  // (layout index, name)
  LowRankSource make;
  float clip = 1.0f;  // AggregateOptions::clip: its values count times this
};

// One delta with its client's weight and clip factor (its values count times it). Spans are
// entries of delta.rows, or target rows when it covers every row.
class LowRankShare final : public Share {
 public:
  LowRankShare(const PreparedDelta& delta, float weight, float clip)
      : delta_(&delta), weight_(weight), clip_(clip) {}
  RowSpan locate(std::uint64_t a, std::uint64_t b, const RowSpan* previous) const override;
  void add_segments(Segments& segs, std::size_t limit) const override;
  void emit(std::size_t tensor, RowSpan span, EmitWeight weight, ShareScratch& scratch,
            TileSink& sink) const override;
  float client_weight() const override { return weight_; }

 private:
  const PreparedDelta* delta_;
  float weight_, clip_;
};

}  // namespace edgefuse::detail
