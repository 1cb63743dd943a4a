// Crash safety of CheckpointWriter: a writer process is
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

TEST_CASE("a kill at each commit phase leaves exactly the old or the new generation") {
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

TEST_CASE("SIGKILL at 50+ random instants never leaves a mixed or partial checkpoint") {
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

namespace {

// Lines of the resume journal after its header: the tensors a killed run made durable.
std::size_t journaled_tensors(const fs::path& staging) {
  std::error_code ec;
  if (!fs::exists(staging / "edgefuse-resume.journal", ec)) return 0;
  const std::string text = ef::test::read_text(staging / "edgefuse-resume.journal");
  std::size_t lines = 0;
  for (const char c : text) lines += c == '\n';
  return lines > 0 ? lines - 1 : 0;
}

std::string all_bytes(const fs::path& dest) {
  std::string out;
  for (const auto& e : fs::directory_iterator(dest))
    out += e.path().filename().string() + ef::test::read_text(e.path());
  return out;
}

}  // namespace

TEST_CASE("resume: SIGKILLed at random instants, a resumable writer keeps exactly its journal") {
  ef::test::ScratchDir dir;
  const fs::path dest = dir / "ckpt", staging = dir / ".ckpt.staging-resume";
  REQUIRE(reap(spawn_writer(dest, 2)) == 0);  // the reference: an uninterrupted, plain write
  const std::string want = all_bytes(dest);
  fs::remove_all(dest);
  const auto t0 = std::chrono::steady_clock::now();
  auto r =
      ef::test::run_program(dir, {EDGEFUSE_CRASH_WRITER, dest.string(), "2", "--resume", "job"});
  const auto full = std::chrono::steady_clock::now() - t0;
  REQUIRE(r.rc == 0);
  CHECK(r.out == "resumed 0 produced 1179648\n");
  CHECK(all_bytes(dest) == want);  // resumable writing changes nothing in the output
  CHECK(!fs::exists(staging));

  std::mt19937_64 rng(7);
  std::uniform_int_distribution<long long> delay(
      0, std::chrono::duration_cast<std::chrono::microseconds>(full).count() * 12 / 10);
  int kills = 0, resumed_runs = 0, finished = 0;
  std::size_t journaled = 0;  // tensors the last killed run left in its journal
  for (int run = 0; run < 400 && (kills < 40 || resumed_runs < 5); ++run) {
    const fs::path out = dir / "out.txt";
    const pid_t pid =
        ef::test::spawn({EDGEFUSE_CRASH_WRITER, dest.string(), "2", "--resume", "job"}, out);
    std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    ::kill(pid, SIGKILL);
    const int rc = reap(pid);
    if (rc == -SIGKILL) {
      ++kills;
      journaled = journaled_tensors(staging);
      CHECK(all_bytes(dest) == want);  // the previous (identical) generation stays intact
      continue;
    }
    REQUIRE(rc == 0);
    ++finished;
    const std::string text = ef::test::read_text(out);
    unsigned resumed = 0;
    unsigned long long produced = 0;
    REQUIRE(std::sscanf(text.c_str(), "resumed %u produced %llu", &resumed, &produced) == 2);
    CHECK(resumed == journaled);  // every journaled tensor kept, nothing else
    CHECK(produced <= 1179648 - std::uint64_t{resumed} * 192 * 1024);
    resumed_runs += resumed > 0;
    CHECK(all_bytes(dest) == want);
    CHECK(!fs::exists(staging));
    journaled = 0;
  }
  MESSAGE("kills " << kills << ", finished runs " << finished << ", of which resumed "
                   << resumed_runs);
  CHECK(kills >= 40);
  CHECK(resumed_runs >= 5);

  // Another identity (another job) discards the journal: nothing is kept.
  std::size_t left = 0;
  for (int attempt = 0; attempt < 200 && left == 0; ++attempt) {
    const pid_t pid =
        ef::test::spawn({EDGEFUSE_CRASH_WRITER, dest.string(), "2", "--resume", "job"});
    std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    ::kill(pid, SIGKILL);
    reap(pid);
    left = journaled_tensors(staging);
  }
  REQUIRE(left > 0);
  r = ef::test::run_program(dir, {EDGEFUSE_CRASH_WRITER, dest.string(), "2", "--resume", "other"});
  REQUIRE(r.rc == 0);
  CHECK(r.out == "resumed 0 produced 1179648\n");
  CHECK(all_bytes(dest) == want);
}
