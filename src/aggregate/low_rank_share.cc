// A low-rank client's share of a target tensor (src/aggregate/low_rank_share.h).
#include "src/aggregate/low_rank_share.h"

#include <algorithm>
#include <cstring>

#include "edgefuse/core/error.h"
#include "edgefuse/kernels/lora_update.h"
#include "src/kernels/nonfinite.h"
#include "src/plan/slicing.h"

namespace edgefuse::detail {

PreparedDelta prepare_delta(LowRankDelta d, const ModelLayout& layout, std::size_t ti,
                            const std::string& label) {
  const auto where = [&]() { return label + ": "; };
  const auto& meta = layout.tensors()[ti].meta;
  if (meta.shape.rank() != 2 || !is_aggregatable(meta.dtype)) {
    fail(where(), "tensor '", d.tensor, "' is ", meta.shape.to_string(), " ",
         dtype_name(meta.dtype), "; a low-rank delta needs a 2-d float weight (client rejected)");
  }
  const std::uint64_t rows = meta.shape[0], cols = meta.shape[1];
  auto check_list = [&](const std::vector<std::uint32_t>& v, std::uint64_t n, const char* what) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (v[i] >= n || (i > 0 && v[i] <= v[i - 1])) {
        fail(where(), "tensor '", d.tensor, "': covered ", what, " must be sorted, distinct and < ",
             n, " (client rejected)");
      }
    }
  };
  check_list(d.rows, rows, "rows");
  check_list(d.cols, cols, "columns");
  const std::uint64_t nr = d.rows.empty() ? rows : d.rows.size();
  const std::uint64_t nc = d.cols.empty() ? cols : d.cols.size();
  if (d.rank == 0 || d.l.size() != nr * d.rank || d.r.size() != d.rank * nc) {
    fail(where(), "tensor '", d.tensor, "': factors of ", d.l.size(), " and ", d.r.size(),
         " values do not make a rank-", d.rank, " update of ", nr, " of its ", rows, " rows and ",
         nc, " of its ", cols, " columns (client rejected)");
  }
  if (!(d.scale - d.scale == 0.0f)) {
    fail(where(), "tensor '", d.tensor, "': scale ", d.scale, " is not finite (client rejected)");
  }
  for (const auto* v : {&d.l, &d.r}) {
    const std::size_t bad =
        first_nonfinite(ConstTensorView(v->data(), DType::kF32, Shape{v->size()}));
    if (bad != kNoIndex) {
      fail(where(), "tensor '", d.tensor, "': a factor holds a non-finite value at element ", bad,
           " (client rejected)");
    }
  }
  PreparedDelta p;
  p.tensor = ti;
  p.rank = d.rank;
  p.scale = d.scale;
  p.rows = std::move(d.rows);
  p.l = std::move(d.l);
  // Column runs, and R re-laid out as one block per run.
  auto col = [&](std::size_t j) -> std::uint32_t {
    return d.cols.empty() ? static_cast<std::uint32_t>(j) : d.cols[j];
  };
  p.r.resize(d.r.size());
  for (std::size_t j = 0; j < nc;) {
    std::size_t e = j + 1;
    while (e < nc && col(e) == col(e - 1) + 1) ++e;
    const ColumnRun run{col(j), static_cast<std::uint32_t>(e - j), j * d.rank};
    for (std::size_t k = 0; k < d.rank; ++k) {
      std::memcpy(p.r.data() + run.r_offset + k * run.len, d.r.data() + k * nc + j,
                  run.len * sizeof(float));
    }
    p.col_runs.push_back(run);
    j = e;
  }
  return p;
}

RowSpan LowRankShare::locate(std::uint64_t a, std::uint64_t b, const RowSpan*) const {
  const PreparedDelta& d = *delta_;
  if (d.rows.empty()) return {static_cast<std::size_t>(a), static_cast<std::size_t>(b)};
  const auto lo = std::lower_bound(d.rows.begin(), d.rows.end(), a);
  return {static_cast<std::size_t>(lo - d.rows.begin()),
          static_cast<std::size_t>(std::lower_bound(lo, d.rows.end(), b) - d.rows.begin())};
}

void LowRankShare::add_segments(Segments& segs, std::size_t limit) const {
  for (const ColumnRun& cr : delta_->col_runs) {
    segs.push_back({cr.c0, std::uint64_t{cr.c0} + cr.len});
    if (segs.size() > limit) return;
  }
}

void LowRankShare::emit(std::size_t, RowSpan span, EmitWeight emit_weight, ShareScratch&,
                        TileSink& sink) const {
  sink.flush();  // it writes the sums directly, after the sources before it
  const PreparedDelta& d = *delta_;
  const TileSums& t = sink.sums();
  const float weight = emit_weight.of(weight_);
  const float scale = weight * clip_ * d.scale;
  // One lora_update per run of consecutive rows [r0, r1) (whose L rows start at l0) and run
  // of consecutive columns.
  auto run = [&](std::uint64_t r0, std::uint64_t r1, const float* l0) {
    const std::size_t nrows = static_cast<std::size_t>(r1 - r0);
    for (const ColumnRun& cr : d.col_runs) {
      lora_update(t.acc + (r0 - t.first_row) * t.row_len + cr.c0, t.row_len, l0,
                  d.r.data() + cr.r_offset, nrows, cr.len, d.rank, scale);
    }
    for (std::uint64_t r = r0; r < r1; ++r) {
      float* wr = t.wsum + (r - t.first_row) * t.row_len;
      std::uint32_t* cnt = t.count ? t.count + (r - t.first_row) * t.row_len : nullptr;
      for (const ColumnRun& cr : d.col_runs) {
        for (std::size_t j = cr.c0; j < cr.c0 + cr.len; ++j) wr[j] += weight;
        if (cnt) {
          for (std::size_t j = cr.c0; j < cr.c0 + cr.len; ++j) ++cnt[j];
        }
      }
    }
  };
  if (d.rows.empty()) {
    run(span.begin, span.end, d.l.data() + span.begin * d.rank);
    return;
  }
  for (std::size_t k = span.begin; k < span.end;) {
    std::size_t m = k + 1;
    while (m < span.end && d.rows[m] == d.rows[m - 1] + 1) ++m;
    run(d.rows[k], std::uint64_t{d.rows[m - 1]} + 1, d.l.data() + k * d.rank);
    k = m;
  }
}

}  // namespace edgefuse::detail
