// Checkpoint I/O benchmarks: read every tensor of a multi-GB sharded checkpoint through the
// reader (mmap views, and pread copies) and write one through the streamed, fsynced,
// atomically committed writer, each beside plain sequential read()/write() of the same bytes
// in the same run, plus the STREAM triad (bench_common.h) as the memory roofline.
//
// Flags (before Google Benchmark's own): --io_bytes=N total data bytes (default 2 GiB),
// --io_dir=PATH scratch folder (default: the system temp folder). Reads run on a warm page
// cache (the files were just written), so they measure the reader's overhead over memory
// bandwidth, not the disk. Writes include fsync of every file, as a commit must.
//
//   ./io_bench                          # 2 GiB, 4 shards of 512 MiB, 16 bf16 tensors
//   ./io_bench --io_bytes=67108864 --benchmark_filter=Read
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "benchmarks/bench_common.h"
#include "edgefuse/io/checkpoint.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

std::uint64_t g_bytes = std::uint64_t{2} << 30;
fs::path g_dir;
constexpr int kTensors = 16;
constexpr int kShards = 4;
constexpr std::size_t kChunk = std::size_t{8} << 20;

fs::path ckpt_dir() { return g_dir / "ckpt"; }
fs::path plain_file(int i) { return g_dir / ("plain-" + std::to_string(i) + ".bin"); }
std::uint64_t tensor_bytes() { return g_bytes / kTensors / 2 * 2; }  // whole bf16 elements

// XOR of every 8-byte word (memcpy loads: the mapping is only 8-byte aligned at best).
std::uint64_t touch(const std::byte* p, std::size_t n) {
  std::uint64_t a = 0, b = 0, c = 0, d = 0;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    std::uint64_t w[4];
    std::memcpy(w, p + i, 32);
    a ^= w[0];
    b ^= w[1];
    c ^= w[2];
    d ^= w[3];
  }
  for (; i < n; ++i) a ^= static_cast<std::uint64_t>(p[i]);
  return a ^ b ^ c ^ d;
}

void write_checkpoint() {
  ef::WriteOptions opt;
  opt.replace_existing = true;
  opt.max_shard_bytes = tensor_bytes() * (kTensors / kShards);
  opt.chunk_bytes = kChunk;
  ef::CheckpointWriter w(ckpt_dir(), opt);
  for (int t = 0; t < kTensors; ++t) {
    w.add("model.layers." + std::to_string(t) + ".mlp.up_proj.weight", ef::DType::kBF16,
          {tensor_bytes() / 2}, [t](std::uint64_t offset, std::byte* dst, std::size_t len) {
            std::memset(dst, static_cast<int>((offset >> 23) + t), len);
          });
  }
  w.commit();
}

void label(benchmark::State& state, const char* what) {
  state.SetLabel(std::string(what) + ", " + std::to_string(g_bytes >> 20) + " MiB");
}

void finish(benchmark::State& state) {
  ef::bench::report(state, static_cast<double>(tensor_bytes() * kTensors),
                    static_cast<double>(tensor_bytes() * kTensors / 2), 1);
}

// ------------------------------------------------------------------------ writes

void BM_CheckpointWrite(benchmark::State& state) {
  for (auto _ : state) write_checkpoint();
  label(state, "CheckpointWriter: stage, fsync, rename");
  finish(state);
}

// Writes the same bytes as the checkpoint to kShards plain files with write() + fsync;
// false on an I/O error.
bool write_plain_files(std::vector<std::byte>& buf) {
  const std::uint64_t per_file = tensor_bytes() * (kTensors / kShards);
  for (int f = 0; f < kShards; ++f) {
    const int fd = ::open(plain_file(f).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return false;
    for (std::uint64_t done = 0; done < per_file;) {
      const std::size_t len =
          static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, per_file - done));
      std::memset(buf.data(), static_cast<int>((done >> 23) + f), len);
      if (::write(fd, buf.data(), len) != static_cast<ssize_t>(len)) {
        ::close(fd);
        return false;
      }
      done += len;
    }
    const bool synced = ::fsync(fd) == 0;
    if (::close(fd) != 0 || !synced) return false;
  }
  return true;
}

void BM_PlainWrite(benchmark::State& state) {
  std::vector<std::byte> buf(kChunk);
  for (auto _ : state) {
    if (!write_plain_files(buf)) state.SkipWithError("plain write failed");
  }
  label(state, "plain write()+fsync");
  finish(state);
}

// ------------------------------------------------------------------------ reads

void BM_CheckpointReadMmap(benchmark::State& state) {
  std::uint64_t sink = 0;
  for (auto _ : state) {
    const auto c = ef::Checkpoint::open(ckpt_dir());
    for (const auto& e : c.tensors()) {
      sink ^= touch(e.file->data(*e.info), static_cast<std::size_t>(e.info->nbytes()));
    }
  }
  benchmark::DoNotOptimize(sink);
  label(state, "Checkpoint::open + every tensor's mmap view, warm cache");
  finish(state);
}

void BM_CheckpointReadPread(benchmark::State& state) {
  std::vector<std::byte> buf(kChunk);
  std::uint64_t sink = 0;
  for (auto _ : state) {
    const auto c = ef::Checkpoint::open(ckpt_dir());
    for (const auto& e : c.tensors()) {
      for (std::uint64_t done = 0; done < e.info->nbytes();) {
        const auto len = std::min<std::uint64_t>(kChunk, e.info->nbytes() - done);
        e.file->read(*e.info, done, buf.data(), len);
        sink ^= touch(buf.data(), static_cast<std::size_t>(len));
        done += len;
      }
    }
  }
  benchmark::DoNotOptimize(sink);
  label(state, "Checkpoint::open + SafetensorsFile::read in 8 MiB pieces, warm cache");
  finish(state);
}

void BM_PlainRead(benchmark::State& state) {
  std::vector<std::byte> buf(kChunk);
  std::uint64_t sink = 0;
  for (auto _ : state) {
    for (int f = 0; f < kShards; ++f) {
      const int fd = ::open(plain_file(f).c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) state.SkipWithError("open failed");
      ssize_t got = 0;
      while ((got = ::read(fd, buf.data(), kChunk)) > 0) {
        sink ^= touch(buf.data(), static_cast<std::size_t>(got));
      }
      ::close(fd);
    }
  }
  benchmark::DoNotOptimize(sink);
  label(state, "plain read() in 8 MiB pieces, warm cache");
  finish(state);
}

BENCHMARK(BM_CheckpointWrite)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK(BM_PlainWrite)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
BENCHMARK(BM_CheckpointReadMmap)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CheckpointReadPread)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PlainRead)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  // Our flags first; the rest go to Google Benchmark.
  std::vector<char*> rest = {argv[0]};
  g_dir = fs::temp_directory_path();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--io_bytes=", 0) == 0) {
      g_bytes = std::stoull(a.substr(11));
    } else if (a.rfind("--io_dir=", 0) == 0) {
      g_dir = a.substr(9);
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (g_bytes < kTensors * 2) {
    std::fprintf(stderr, "io_bench: --io_bytes must be at least %d\n", kTensors * 2);
    return 2;
  }
  std::random_device rd;
  g_dir /= "edgefuse-io-bench-" + std::to_string(rd());
  fs::create_directories(g_dir);
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;
  ef::bench::measure_triads();
  ef::set_num_threads(1);
  // The files the read benchmarks read exist before any of them runs.
  write_checkpoint();
  std::vector<std::byte> buf(kChunk);
  if (!write_plain_files(buf)) {
    std::fprintf(stderr, "io_bench: cannot write the plain files in %s\n", g_dir.c_str());
    return 3;
  }
  // Flush the set-up's dirty pages now, or their writeback lands inside the first write
  // benchmark (seen: the first of 3 repetitions 2x slower than the third).
  ::sync();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::error_code ec;
  fs::remove_all(g_dir, ec);
  return 0;
}
