// Crash safety of CheckpointWriter (reliability.md §5.3 rows 40, 41, 46): a writer process is
// SIGKILLed at random instants (blackbox) and at each commit phase (whitebox); after every
// kill the destination must hold exactly the complete old or the complete new generation.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>

#include "edgefuse/io/checkpoint.h"
#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

pid_t spawn_writer(const fs::path& dest, int gen, const std::string& die_at = "") {
  std::vector<std::string> args = {EDGEFUSE_CRASH_WRITER, dest.string(), std::to_string(gen)};
  if (!die_at.empty()) {
    args.push_back("--die-at");
    args.push_back(die_at);
  }
  return ef::test::spawn(args);
}

using ef::test::reap;

// The generation the destination holds, after checking that it is complete and consistent.
int verified_generation(const fs::path& dest) {
  const auto c = ef::Checkpoint::open(dest);
  REQUIRE(!c.shards().empty());
  const int gen = std::stoi(c.shards()[0].metadata().at("generation"));
  for (const auto& s : c.shards()) REQUIRE(s.metadata().at("generation") == std::to_string(gen));
  REQUIRE(c.shards().size() == (gen % 2 == 0 ? 3u : 2u));
  REQUIRE(c.size() == 6);
  for (int k = 0; k < 6; ++k) {
    const auto v = c.view("t" + std::to_string(k));
    REQUIRE(v.nbytes() == 192 * 1024);
    const auto want = static_cast<std::byte>((7 * gen + k) % 251);
    for (std::uint64_t i = 0; i < v.nbytes(); ++i) {
      if (v.bytes()[i] != want) FAIL("generation " << gen << " tensor t" << k << " byte " << i);
    }
  }
  return gen;
}

std::size_t staging_folders(const fs::path& parent) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(parent)) {
    n += e.path().filename().string().find(".staging-") != std::string::npos;
  }
  return n;
}

}  // namespace

TEST_CASE("row 41: a kill at each commit phase leaves exactly the old or the new generation") {
  ef::test::ScratchDir dir;
  const fs::path dest = dir / "ckpt";
  REQUIRE(reap(spawn_writer(dest, 0)) == 0);
  int gen = 0;
  const struct {
    const char* phase;
    bool published;
  } points[] = {{"staged", false},         {"file-written:1", false}, {"file-written:2", false},
                {"file-written:3", false}, {"synced", false},         {"cleaned", true},
                {"published", true}};
  for (const auto& p : points) {
    CAPTURE(p.phase);
    const int next = gen + 1;
    CHECK(reap(spawn_writer(dest, next, p.phase)) == -SIGKILL);
    const int seen = verified_generation(dest);
    CHECK(seen == (p.published ? next : gen));
    gen = seen;
  }
  // Killed after the exchange, the writer leaves its staging folder holding the old
  // checkpoint; the next writer removes it before anything else.
  CHECK(staging_folders(dir.path()) >= 1);
  REQUIRE(reap(spawn_writer(dest, gen + 1)) == 0);
  CHECK(verified_generation(dest) == gen + 1);
  CHECK(staging_folders(dir.path()) == 0);
}

TEST_CASE("row 40: SIGKILL at 50+ random instants never leaves a mixed or partial checkpoint") {
  ef::test::ScratchDir dir;
  const fs::path dest = dir / "ckpt";
  REQUIRE(reap(spawn_writer(dest, 0)) == 0);
  // Time a full run to spread the kills over it.
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(reap(spawn_writer(dest, 1)) == 0);
  const auto full = std::chrono::steady_clock::now() - t0;
  int committed = verified_generation(dest);
  REQUIRE(committed == 1);
  std::mt19937_64 rng(20261121);
  std::uniform_int_distribution<long long> delay(
      0, std::chrono::duration_cast<std::chrono::microseconds>(full).count() * 13 / 10);
  int kills = 0, kept_old = 0, got_new = 0, finished = 0;
  for (int gen = 2; kills < 60 && gen < 400; ++gen) {
    const pid_t pid = spawn_writer(dest, gen);
    std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    ::kill(pid, SIGKILL);
    const int rc = reap(pid);
    const int seen = verified_generation(dest);
    if (rc == -SIGKILL) {
      ++kills;
      CHECK((seen == committed || seen == gen));
      (seen == gen ? got_new : kept_old) += 1;
    } else {
      REQUIRE(rc == 0);
      ++finished;
      CHECK(seen == gen);
    }
    committed = seen;
  }
  MESSAGE("kills " << kills << ": old kept " << kept_old << ", new published " << got_new
                   << "; runs that finished first " << finished);
  CHECK(kills >= 50);
  CHECK(kept_old > 0);
  REQUIRE(reap(spawn_writer(dest, 1000)) == 0);
  CHECK(verified_generation(dest) == 1000);
  CHECK(staging_folders(dir.path()) == 0);
}
