// Example: write a sharded bf16 checkpoint without holding it in memory, read it back lazily,
// then fuse a client delta into one tensor and commit the result atomically over the old one.
//
//   ./example_checkpoint_roundtrip /tmp/edgefuse-example
#include <cstdio>
#include <filesystem>
#include <vector>

#include "edgefuse/edgefuse.h"

namespace ef = edgefuse;

int main(int argc, char** argv) {
  const std::filesystem::path root =
      argc > 1 ? argv[1] : std::filesystem::temp_directory_path() / "edgefuse-example";
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  const auto target = root / "target";

  // 1. Write: 4 tensors of 1024 x 1024 bf16 (2 MiB each), shards of at most 4 MiB. Each
  //    tensor's bytes come from a callback in 1 MiB pieces: element i of tensor t is t + 1.
  {
    ef::WriteOptions opt;
    opt.max_shard_bytes = 4u << 20;
    opt.chunk_bytes = 1u << 20;
    ef::CheckpointWriter w(target, opt);
    for (int t = 0; t < 4; ++t) {
      const ef::BFloat16 v = ef::to_bf16(static_cast<float>(t + 1));
      w.add("layers." + std::to_string(t) + ".weight", ef::DType::kBF16, {1024, 1024},
            [v](std::uint64_t, std::byte* dst, std::size_t len) {
              auto* p = reinterpret_cast<ef::BFloat16*>(dst);
              for (std::size_t i = 0; i < len / 2; ++i) p[i] = v;
            });
    }
    for (const auto& f : w.commit()) std::printf("wrote %s\n", f.c_str());
  }

  // 2. Read: opening reads the index and headers only; views map the data.
  const auto ckpt = ef::Checkpoint::open(target);
  std::printf("opened %zu tensors in %zu shards, %llu bytes\n", ckpt.size(), ckpt.shards().size(),
              static_cast<unsigned long long>(ckpt.total_bytes()));
  const ef::ConstTensorView w2 = ckpt.view("layers.2.weight");

  // 3. Fuse: new = old + 0.5 * delta in f32, back to bf16, written over the old checkpoint.
  const std::size_t n = static_cast<std::size_t>(w2.numel());
  std::vector<float> acc(n, 0.0f);
  std::vector<ef::BFloat16> delta(n, ef::to_bf16(2.0f));
  ef::accumulate(acc.data(), delta.data(), n, 0.5f);
  std::vector<float> wsum(n, 1.0f);
  std::vector<ef::BFloat16> fused(n);
  ef::finalize(fused.data(), w2.data_as<ef::BFloat16>(), acc.data(), wsum.data(), n,
               ef::FinalizeMode::kDelta);
  {
    ef::WriteOptions opt;
    opt.max_shard_bytes = 4u << 20;
    opt.replace_existing = true;
    ef::CheckpointWriter w(target, opt);
    for (const auto& e : ckpt.tensors()) {
      if (e.info->name == "layers.2.weight") {
        w.add(e.info->name, ef::ConstTensorView(fused.data(), ef::DType::kBF16, e.info->shape));
      } else {
        w.add(e.info->name, e.file->view(*e.info));  // copied straight from the old mapping
      }
    }
    w.commit();
  }
  const auto again = ef::Checkpoint::open(target);
  std::printf("layers.2.weight[0] = %g (was 3)\n",
              ef::to_f32(again.view("layers.2.weight").data_as<ef::BFloat16>()[0]));
  return 0;
}
