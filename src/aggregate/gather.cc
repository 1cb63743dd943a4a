// One tile's values of each client that reaches it (src/aggregate/gather.h).
#include "src/aggregate/gather.h"

#include <cstring>
#include <limits>

#include "src/kernels/tile.h"

namespace edgefuse::detail {

bool locate_shares(const std::vector<const Share*>& shares, std::uint64_t a, std::uint64_t b,
                   bool follows_previous, std::vector<RowSpan>& spans) {
  spans.resize(shares.size());
  bool any = false;
  for (std::size_t k = 0; k < shares.size(); ++k) {
    spans[k] = shares[k]->locate(a, b, follows_previous ? &spans[k] : nullptr);
    any = any || !spans[k].empty();
  }
  return any;
}

void gather_tile(const std::vector<const Share*>& shares, const std::vector<RowSpan>& spans,
                 std::size_t tensor, std::uint64_t first_row, std::size_t rows, std::size_t row_len,
                 GatherBuffers& g) {
  const std::size_t n = rows * row_len;
  g.present.clear();
  g.weights.clear();
  for (std::size_t k = 0; k < shares.size(); ++k) {
    if (spans[k].empty()) continue;
    g.present.push_back(k);
    g.weights.push_back(shares[k]->client_weight());
  }
  g.values.resize(g.present.size() * n);
  if (g.slots.size() < shares.size()) g.slots.resize(shares.size());
  for (std::size_t j = 0; j < g.present.size(); ++j) {
    const std::size_t k = g.present[j];
    gather_share(*shares[k], spans[k], tensor, first_row, rows, row_len, g.slots[k], g,
                 g.values.data() + j * n);
  }
}

void gather_share(const Share& share, const RowSpan& span, std::size_t tensor,
                  std::uint64_t first_row, std::size_t rows, std::size_t row_len,
                  ShareScratch& slot, GatherBuffers& g, float* x) {
  const std::size_t n = rows * row_len;
  fill_f32(x, n, -0.0f);  // -0 + 1 * v is v, -0 included
  g.covered.resize(n);
  std::memset(g.covered.data(), 0, n * sizeof(float));
  const TileSums own{x, g.covered.data(), nullptr, first_row, rows, row_len};
  TileSink sink(own, g.batch, g.made, g.made_rows);
  share.emit(tensor, span, EmitWeight{1.0f, true}, slot, sink);
  sink.flush();
  for (std::size_t e = 0; e < n; ++e) {
    if (!(g.covered[e] > 0.0f)) x[e] = std::numeric_limits<float>::quiet_NaN();
  }
}

}  // namespace edgefuse::detail
