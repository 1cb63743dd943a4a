// Uses the installed edgefuse: one FedAvg step over two bf16 client updates.
#include <edgefuse/edgefuse.h>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> acc(100, 0.0f), wsum(100, 0.0f), ones(100, 1.0f);
  std::vector<edgefuse::BFloat16> base(100, edgefuse::to_bf16(1.0f));
  std::vector<edgefuse::BFloat16> delta(100, edgefuse::to_bf16(0.5f));
  edgefuse::accumulate(acc.data(), delta.data(), 100, 1.0f);
  edgefuse::accumulate(wsum.data(), ones.data(), 100, 1.0f);
  edgefuse::finalize(base.data(), base.data(), acc.data(), wsum.data(), 100,
                     edgefuse::FinalizeMode::kDelta);
  if (edgefuse::to_f32(base[42]) != 1.5f) {
    std::printf("consumer: wrong value %g\n", static_cast<double>(edgefuse::to_f32(base[42])));
    return 1;
  }
  std::printf("consumer: accumulate ok on %s\n", edgefuse::simd_target_name());
  return 0;
}
