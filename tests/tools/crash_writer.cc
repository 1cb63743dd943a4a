// Test helper for the crash-safety tests: writes generation GEN of a small sharded checkpoint
// to DEST (replacing what is there) through CheckpointWriter, then exits 0. With
// --die-at PHASE[:N] it SIGKILLs itself at the N-th (default first) report of that commit
// phase, a kill at a known point of the protocol.
//
// Generation g has 6 U8 tensors t0..t5 of 192 KiB; every byte of t_k is (7g + k) mod 251, and
// each shard's __metadata__ says {"generation": "g"}. Even generations use 3 shards, odd ones
// 2, so a mix of two generations cannot look consistent.
//
// With --resume ID the write is resumable (WriteOptions::resume_identity = ID) and at the end
// it prints "resumed K produced P": the tensors kept from a killed run and the bytes produced.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "edgefuse/io/checkpoint.h"

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5) {
    std::fprintf(stderr, "usage: crash_writer DEST GEN [--die-at PHASE[:N] | --resume ID]\n");
    return 2;
  }
  const int gen = std::atoi(argv[2]);
  std::string die_phase;
  int die_count = 1;
  edgefuse::WriteOptions opt;
  if (argc == 5 && std::strcmp(argv[3], "--resume") == 0) {
    opt.resume_identity = argv[4];
  } else if (argc == 5) {
    die_phase = argv[4];
    if (const auto colon = die_phase.find(':'); colon != std::string::npos) {
      die_count = std::atoi(die_phase.c_str() + colon + 1);
      die_phase.resize(colon);
    }
  }
  constexpr std::uint64_t kBytes = 192 * 1024;
  std::size_t resumed = 0;
  std::uint64_t produced = 0;
  opt.on_resumed = [&](std::string_view, std::string_view note, std::uint64_t) {
    if (note != "ok") std::abort();  // the note of journal_note below comes back
    ++resumed;
  };
  opt.journal_note = [](std::string_view) { return std::string("ok"); };
  opt.replace_existing = true;
  opt.max_shard_bytes = (gen % 2 == 0) ? 2 * kBytes : 3 * kBytes;
  opt.chunk_bytes = 16 * 1024;
  opt.metadata = {{"generation", std::to_string(gen)}};
  int seen = 0;
  opt.on_phase = [&](std::string_view phase) {
    if (phase == die_phase && ++seen == die_count) std::raise(SIGKILL);
  };
  try {
    edgefuse::CheckpointWriter w(argv[1], opt);
    for (int k = 0; k < 6; ++k) {
      const auto value = static_cast<unsigned char>((7 * gen + k) % 251);
      w.add("t" + std::to_string(k), edgefuse::DType::kU8, {kBytes},
            [value, &produced](std::uint64_t, std::byte* dst, std::size_t len) {
              std::memset(dst, value, len);
              produced += len;
            });
    }
    w.commit();
    if (!opt.resume_identity.empty())
      std::printf("resumed %zu produced %llu\n", resumed,
                  static_cast<unsigned long long>(produced));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "crash_writer: %s\n", e.what());
    return 1;
  }
  return 0;
}
