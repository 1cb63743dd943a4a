// Helpers shared by the io tests: building safetensors bytes by hand, scratch folders, and
// asserting which CheckpointRule an input breaks.
#pragma once

#include <doctest/doctest.h>

#include <fcntl.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>

#include "edgefuse/io/checkpoint.h"

namespace edgefuse::test {

// 8-byte little-endian n.
inline std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>(n >> (8 * i));
  return s;
}

// A safetensors file: the header text as given (no padding added) and the data bytes.
inline std::string st_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// One header entry: "name":{"dtype":..,"shape":..,"data_offsets":[begin,end]}.
inline std::string entry(const std::string& name, const std::string& dtype,
                         const std::string& shape, std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

inline SafetensorsHeader parse_bytes(const std::string& bytes) {
  return parse_safetensors(bytes.data(), bytes.size(), "mem.safetensors");
}

// The rule `fn` throws with; fails the test if it throws nothing or something else.
inline CheckpointRule rule_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.rule();
  } catch (const std::exception& e) {
    FAIL("threw a non-CheckpointError: " << e.what());
  }
  FAIL("did not throw");
  return CheckpointRule::kIo;
}

inline CheckpointRule parse_rule(const std::string& bytes) {
  return rule_of([&] { parse_bytes(bytes); });
}

// A fresh empty folder under the system temp folder, removed with the object.
class ScratchDir {
 public:
  ScratchDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("edgefuse-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void write_text(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace edgefuse::test

namespace edgefuse::test {
// Largest single operator-new allocation made while fn runs (0 in sanitizer builds, whose
// allocator cannot be probed). Defined in io_main.cc.
std::size_t largest_allocation_during(const std::function<void()>& fn);
}  // namespace edgefuse::test

#include <spawn.h>
#include <sys/wait.h>

extern char** environ;

namespace edgefuse::test {

// Starts args[0] with args, stdout and stderr sent to the given files when not empty.
inline pid_t spawn(const std::vector<std::string>& args, const std::filesystem::path& out = {},
                   const std::filesystem::path& err = {}) {
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (!out.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  if (!err.empty()) {
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE(rc == 0);
  return pid;
}

// Waits for pid; returns its exit status, or -signal when a signal ended it.
inline int reap(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
}

struct CliRun {
  int rc;
  std::string out;
  std::string err;
};

// Runs args[0] to completion with stdout and stderr captured in files of `dir`.
inline CliRun run_program(const ScratchDir& dir, const std::vector<std::string>& args) {
  const std::filesystem::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const int rc = reap(spawn(args, out, err));
  return {rc, read_text(out), read_text(err)};
}

}  // namespace edgefuse::test
