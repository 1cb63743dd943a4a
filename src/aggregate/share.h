// Private: the one interface through which every kind of client reaches the tile loop.
//
// A Share is one client's part of one target tensor. For each tile of target rows [a, b) the
// loop asks every share of the tensor, in a fixed order, where its rows are (locate), which
// columns of a row it covers (add_segments), and then has it add weight x value and weight
// into the tile's sums (emit). A dense sub-model update, a client whose rows are generated
// on demand and a low-rank delta are three implementations; the loop knows none of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "edgefuse/kernels/scatter.h"

namespace edgefuse::detail {

// A share's entries [begin, end) that land in a tile (rows of its own list, or target rows
// for a share that lists none); empty when it does not reach the tile.
struct RowSpan {
  std::size_t begin = 0, end = 0;
  bool empty() const noexcept { return begin == end; }
};

// Column ranges [first, second) of a target row.
using Segments = std::vector<std::pair<std::uint64_t, std::uint64_t>>;

// The f32 sums of one tile: target rows [first_row, first_row + rows), row_len elements each,
// row-major. count is null when contributors are not counted.
struct TileSums {
  float* acc;
  float* wsum;
  std::uint32_t* count;
  std::uint64_t first_row;
  std::size_t rows, row_len;
};

// Per-thread lists a share fills while it emits; they must outlive the sink's next flush.
struct ShareScratch {
  std::vector<std::uint32_t> dst_rows, src_rows;
};

// Collects scatter sources and adds them to the tile's sums in the order they came. A share
// that writes the sums itself, or reuses made(), flushes first so that per element the order
// of additions stays the order of the shares.
class TileSink {
 public:
  TileSink(const TileSums& sums, std::vector<ScatterSource>& batch, std::vector<float>& made,
           std::vector<std::uint32_t>& made_rows)
      : sums_(sums), batch_(batch), made_(made), made_rows_(made_rows) {
    batch_.clear();
  }
  const TileSums& sums() const noexcept { return sums_; }
  void add(const ScatterSource& source) { batch_.push_back(source); }
  void flush();
  // A buffer of n f32 values for rows a share makes itself (valid until the next made()).
  float* made(std::size_t n);
  // 0, 1, ..., n - 1.
  const std::uint32_t* first_rows(std::size_t n);

 private:
  TileSums sums_;
  std::vector<ScatterSource>& batch_;
  std::vector<float>& made_;
  std::vector<std::uint32_t>& made_rows_;
};

// The weight a share emits with: its client's weight times `mul` (1; a power of two when a
// tile is computed again after an overflow), or 1 with `unit` (a client's own values, gathered
// one client at a time for the robust rules).
struct EmitWeight {
  float mul = 1.0f;
  bool unit = false;
  float of(float client_weight) const noexcept { return unit ? 1.0f : client_weight * mul; }
};

class Share {
 public:
  virtual ~Share() = default;
  // Its entries inside tile rows [a, b). `previous` is its span in the tile before, when
  // that tile ended at a (tiles of one chunk run in order), or null.
  virtual RowSpan locate(std::uint64_t a, std::uint64_t b, const RowSpan* previous) const = 0;
  // Appends the column ranges it covers in every row it reaches, stopping once segs holds
  // more than `limit` entries.
  virtual void add_segments(Segments& segs, std::size_t limit) const = 0;
  // Adds w x value to acc, w to wsum and 1 to count (when counted) at each element it covers in
  // the rows of `span`, of layout tensor `tensor`, where w = weight.of(its client's weight).
  virtual void emit(std::size_t tensor, RowSpan span, EmitWeight weight, ShareScratch& scratch,
                    TileSink& sink) const = 0;
  // Its client's weight (the weighted median's).
  virtual float client_weight() const = 0;
};

}  // namespace edgefuse::detail
