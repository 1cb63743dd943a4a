// Private: one tile's values of each client that reaches it, side by side, for the rules that
// need each client's own values (the robust aggregates, the whole-update statistics): every
// share present emits at unit weight into a slice of its own, NaN where it does not cover.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/aggregate/share.h"

namespace edgefuse::detail {

// Each share's rows in tile [a, b) into spans; whether any share reaches it. `follows_previous`:
// spans hold the shares' spans of the tile that ended at a.
bool locate_shares(const std::vector<const Share*>& shares, std::uint64_t a, std::uint64_t b,
                   bool follows_previous, std::vector<RowSpan>& spans);

struct GatherBuffers {
  std::vector<ShareScratch> slots;  // by share
  std::vector<ScatterSource> batch;
  std::vector<float> made;
  std::vector<std::uint32_t> made_rows;
  std::vector<float> covered;        // n: a share's weight sums while it emits
  std::vector<float> values;         // present.size() slices of n values
  std::vector<std::size_t> present;  // the share of each slice, in share order
  std::vector<float> weights;        // each slice's client weight
};

// The values of the shares with a non-empty span, for tile rows [first_row, first_row + rows)
// of row_len elements (n = rows * row_len): slice j of g.values holds share g.present[j]'s
// values, NaN at the elements it does not cover.
void gather_tile(const std::vector<const Share*>& shares, const std::vector<RowSpan>& spans,
                 std::size_t tensor, std::uint64_t first_row, std::size_t rows, std::size_t row_len,
                 GatherBuffers& g);

// One share's values for those rows into x (n values, NaN where it does not cover), with
// g's emit buffers (g.slots, values and present are not used).
void gather_share(const Share& share, const RowSpan& span, std::size_t tensor,
                  std::uint64_t first_row, std::size_t rows, std::size_t row_len,
                  ShareScratch& slot, GatherBuffers& g, float* x);

}  // namespace edgefuse::detail
