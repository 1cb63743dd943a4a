// Two clients of a HeteroFL/FedRolex round, each owning a window of one 8-wide row of a bf16
// target, fused with accumulate_runs + finalize. Client A owns columns 6,7,0,1 (a window
// that wraps around: two runs), client B owns columns 0,1,2 (one run); columns 3,4,5 belong
// to nobody and keep their value.
#include <edgefuse/edgefuse.h>

#include <cstdio>
#include <vector>

int main() {
  using edgefuse::BFloat16;
  std::vector<BFloat16> row(8, edgefuse::to_bf16(1.0f));  // the target row, all ones
  std::vector<float> acc(8, 0.0f), wsum(8, 0.0f);

  // Client A sends deltas of +0.5 for its 4 columns, with weight 1.
  const edgefuse::Run a_runs[] = {{6, 2}, {0, 2}};
  const std::vector<BFloat16> a_delta(4, edgefuse::to_bf16(0.5f));
  const std::vector<float> ones(4, 1.0f);
  edgefuse::accumulate_runs(acc.data(), 8, a_delta.data(), 4, a_runs, 2, 1.0f);
  edgefuse::accumulate_runs(wsum.data(), 8, ones.data(), 4, a_runs, 2, 1.0f);

  // Client B sends +0.5, +0.5, +0.25 for columns 0..2, with weight 3.
  const edgefuse::Run b_runs[] = {{0, 3}};
  const std::vector<BFloat16> b_delta = {edgefuse::to_bf16(0.5f), edgefuse::to_bf16(0.5f),
                                         edgefuse::to_bf16(0.25f)};
  edgefuse::accumulate_runs(acc.data(), 8, b_delta.data(), 3, b_runs, 1, 3.0f);
  edgefuse::accumulate_runs(wsum.data(), 8, ones.data(), 3, b_runs, 1, 3.0f);

  // Coverage-weighted mean of the deltas, written back in place.
  edgefuse::finalize(row.data(), row.data(), acc.data(), wsum.data(), 8,
                     edgefuse::FinalizeMode::kDelta, 1.0f);
  std::printf("row 0:");
  for (const BFloat16 v : row) std::printf(" %g", static_cast<double>(edgefuse::to_f32(v)));
  std::printf("\n");
  return 0;
}
