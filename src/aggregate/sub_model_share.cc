// A sub-model client's share of a target tensor (src/aggregate/sub_model_share.h).
#include "src/aggregate/sub_model_share.h"

#include <algorithm>

#include "src/aggregate/row_shape.h"

namespace edgefuse::detail {
namespace {

// Sorts pairs by their first element unless they already are (a window that does not wrap,
// a whole axis): the common case costs one pass.
template <typename Pair>
void sort_if_needed(std::vector<Pair>& v) {
  if (!std::is_sorted(v.begin(), v.end())) std::sort(v.begin(), v.end());
}

}  // namespace

bool SubModelShare::make(const ModelLayout& layout, const ModelLayout::Tensor& t,
                         const SubModelClient& client, SubModelShare& w) {
  const int rank = t.meta.shape.rank();
  const auto s = slice_of(layout, t, *client.lists, true);
  w.client_ = &client;
  const RowShape local = row_shape(s.local_shape);
  w.x_rows_ = local.rows;
  w.x_row_len_ = local.row_len;
  // Rows.
  if (rank >= 2) {
    std::vector<std::pair<std::uint32_t, std::uint32_t>> rows;
    rows.reserve(s.elems[0].size());
    for (std::size_t i = 0; i < s.elems[0].size(); ++i) {
      if (s.keep[0][i]) rows.push_back({s.elems[0][i], static_cast<std::uint32_t>(i)});
    }
    sort_if_needed(rows);
    w.trow_.resize(rows.size());
    w.lrow_.resize(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      w.trow_[i] = rows[i].first;
      w.lrow_[i] = rows[i].second;
    }
  } else {
    w.trow_ = {0};
    w.lrow_ = {0};
  }
  // Inner positions (target offset, local offset) of dims 1.. (or dim 0 for rank 1).
  std::vector<std::pair<std::uint64_t, std::uint64_t>> inner;
  const int first = rank >= 2 ? 1 : 0;
  if (rank == 0) {
    inner.push_back({0, 0});
  } else {
    std::vector<std::uint64_t> tstride(static_cast<std::size_t>(rank), 1),
        lstride(static_cast<std::size_t>(rank), 1);
    for (int d = rank - 2; d >= first; --d) {
      tstride[d] = tstride[d + 1] * t.meta.shape[d + 1];
      lstride[d] = lstride[d + 1] * s.local_shape[d + 1];
    }
    std::vector<std::size_t> at(static_cast<std::size_t>(rank), 0);
    bool empty = false;
    std::uint64_t count = 1;
    for (int d = first; d < rank; ++d) {
      empty = empty || s.elems[d].empty();
      count *= s.elems[d].size();
    }
    if (!empty) inner.reserve(count);
    while (!empty) {
      bool keep = true;
      std::uint64_t to = 0, lo = 0;
      for (int d = first; d < rank; ++d) {
        keep = keep && s.keep[d][at[d]];
        to += s.elems[d][at[d]] * tstride[d];
        lo += at[d] * lstride[d];
      }
      if (keep) inner.push_back({to, lo});
      int d = rank - 1;
      for (; d >= first; --d) {
        if (++at[d] < s.elems[d].size()) break;
        at[d] = 0;
      }
      if (d < first) break;
    }
  }
  sort_if_needed(inner);
  for (std::size_t i = 0; i < inner.size();) {
    std::size_t j = i + 1;
    while (j < inner.size() && inner[j].first == inner[j - 1].first + 1 &&
           inner[j].second == inner[j - 1].second + 1) {
      ++j;
    }
    w.runs_.push_back({inner[i].first, inner[i].second, j - i});
    i = j;
  }
  if (w.trow_.empty() || w.runs_.empty()) return false;  // masked out entirely
  // Every row in place (a full axis such as the vocabulary): no lists, which for a
  // thousand clients of a 32000-row embedding would be 256 MB.
  bool same = true;
  for (std::size_t i = 0; i < w.trow_.size() && same; ++i)
    same = w.trow_[i] == i && w.lrow_[i] == i;
  if (same) {
    w.identity_ = true;
    w.identity_rows_ = w.trow_.size();
    w.trow_ = {};
    w.lrow_ = {};
  }
  return true;
}

RowSpan SubModelShare::locate(std::uint64_t a, std::uint64_t b, const RowSpan* previous) const {
  if (identity_) {
    return {static_cast<std::size_t>(std::min(a, identity_rows_)),
            static_cast<std::size_t>(std::min(b, identity_rows_))};
  }
  if (previous == nullptr) {
    const auto lo = std::lower_bound(trow_.begin(), trow_.end(), a);
    return {static_cast<std::size_t>(lo - trow_.begin()),
            static_cast<std::size_t>(std::lower_bound(lo, trow_.end(), b) - trow_.begin())};
  }
  // Going on from the previous tile's end.
  std::size_t hi = previous->end;
  while (hi < trow_.size() && trow_[hi] < b) ++hi;
  return {previous->end, hi};
}

void SubModelShare::add_segments(Segments& segs, std::size_t limit) const {
  for (const ScatterRun& run : runs_) {
    segs.push_back({run.dst, run.dst + run.len});
    if (segs.size() > limit) return;
  }
}

void SubModelShare::emit(std::size_t tensor, RowSpan span, EmitWeight emit_weight,
                         ShareScratch& scratch, TileSink& sink) const {
  const std::uint64_t a = sink.sums().first_row;
  const std::size_t n = span.end - span.begin;
  auto& dst = scratch.dst_rows;
  dst.resize(n);
  const std::uint32_t* lrow = nullptr;
  if (identity_) {
    auto& src = scratch.src_rows;
    src.resize(n);
    for (std::size_t r = span.begin; r < span.end; ++r) {
      dst[r - span.begin] = static_cast<std::uint32_t>(r - a);
      src[r - span.begin] = static_cast<std::uint32_t>(r);
    }
    lrow = src.data();
  } else {
    for (std::size_t r = span.begin; r < span.end; ++r) {
      dst[r - span.begin] = static_cast<std::uint32_t>(trow_[r] - a);
    }
    lrow = lrow_.data() + span.begin;
  }
  const float weight = emit_weight.of(client_->weight);
  if (client_->rows) {  // the rows are made into the sink's buffer, which the sources before use
    sink.flush();
    float* made = sink.made(n * static_cast<std::size_t>(x_row_len_));
    client_->rows(tensor, lrow, n, static_cast<std::size_t>(x_row_len_), made);
    sink.add({made, DType::kF32, n, x_row_len_, dst.data(), sink.first_rows(n), n, runs_.data(),
              runs_.size(), weight, client_->clip});
    sink.flush();
    return;
  }
  const ConstTensorView& x = client_->local[tensor];
  sink.add({x.bytes(), x.dtype(), x_rows_, x_row_len_, dst.data(), lrow, n, runs_.data(),
            runs_.size(), weight, client_->clip});
}

std::uint64_t SubModelShare::bound(const Shape& local, bool identity_rows) {
  const std::uint64_t rows = local.rank() >= 2 ? local[0] : 1;
  const std::uint64_t inner = rows ? local.numel() / rows : 0;
  return 128 + (identity_rows ? 0 : 8 * rows) + (sizeof(ScatterRun) + 16) * inner;
}

}  // namespace edgefuse::detail
