// Private: a sub-model client (an update held as tensor views, or rows generated on demand)
// and its share of one target tensor.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "src/aggregate/share.h"
#include "src/plan/slicing.h"

namespace edgefuse::detail {

struct SubModelClient {
  std::string label;
  float weight = 0.0f;
  Plan plan;
  std::shared_ptr<const PlanLists> lists;
  std::vector<ConstTensorView> local;  // by layout tensor; empty views where it holds none
  std::vector<char> holds;             // by layout tensor: 1 when it sends values for it
  LocalRowSource rows;                 // set: local rows made on demand, `local` unused
  bool pending = false;                // FiniteCheck::kWhileFusing: values not scanned yet
  float clip = 1.0f;                   // AggregateOptions::clip: its values count times this
};

// A client's share of one target tensor: which of its local rows land on which target rows
// (sorted by target row), and which stretches of a local row land where in a target row.
class SubModelShare final : public Share {
 public:
  // Built by make(); false when the client covers none of the tensor.
  static bool make(const ModelLayout& layout, const ModelLayout::Tensor& t,
                   const SubModelClient& client, SubModelShare& share);
  RowSpan locate(std::uint64_t a, std::uint64_t b, const RowSpan* previous) const override;
  void add_segments(Segments& segs, std::size_t limit) const override;
  void emit(std::size_t tensor, RowSpan span, EmitWeight weight, ShareScratch& scratch,
            TileSink& sink) const override;
  float client_weight() const override { return client_->weight; }

  // Upper bound of the bytes make() and its temporaries hold for a tensor whose local shape
  // is `local`: row lists (none when its rows map to themselves), one scatter run and one
  // (target, local) offset pair per inner position.
  static std::uint64_t bound(const Shape& local, bool identity_rows);

 private:
  const SubModelClient* client_ = nullptr;
  std::vector<std::uint32_t> trow_, lrow_;  // empty when its rows are target rows 0, 1, ...
  std::vector<ScatterRun> runs_;
  std::uint64_t x_rows_ = 0, x_row_len_ = 0;
  bool identity_ = false;  // local row i is target row i for i < identity_rows_
  std::uint64_t identity_rows_ = 0;
};

}  // namespace edgefuse::detail
