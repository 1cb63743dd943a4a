// The edgefuse command-line program. Subcommands: demo, inspect, plan, extract, fuse (alias
// aggregate), simulate, merge-lora, unmerge-lora. It links no LibTorch (what trains is
// edgefuse-lab). Exit status: 0 success, 1 a check failed (demo verification), 2 bad arguments or
// input, 3 an internal error.
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "src/cli/commands.h"

namespace {

// An error line of at most kMaxErrorBytes: a 4000-character name or a 10,000-digit number in
// the input does not make a 10 KB line.
constexpr std::size_t kMaxErrorBytes = 1000;
std::string capped(const char* what) {
  std::string s = what;
  if (s.size() <= kMaxErrorBytes) return s;
  const std::size_t more = s.size() - kMaxErrorBytes;
  s.resize(kMaxErrorBytes);
  return s + "... (" + std::to_string(more) + " more bytes)";
}

}  // namespace

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) makes write() fail with EFBIG instead of killing the
  // process, so the writer's error path runs and keeps what is resumable.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"edgefuse: fuse many small edge-device models into one large target model"};
  app.require_subcommand(1);
  namespace cli = edgefuse::cli;
  std::vector<cli::Command> commands{cli::add_demo(app), cli::add_inspect(app),
                                     cli::add_plan(app), cli::add_extract(app),
                                     cli::add_fuse(app), cli::add_simulate(app)};
  for (cli::Command& c : cli::add_merge_lora(app)) commands.push_back(std::move(c));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every usage error exits 2, like invalid input.
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    for (const cli::Command& c : commands) {
      if (c.cli->parsed()) return c.run();
    }
  } catch (const edgefuse::Error& e) {
    // One line: io errors read "<file>: <what is wrong> (<Rule>)".
    std::fprintf(stderr, "error: %s\n", capped(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "error: out of memory (the address-space or memory limit of this process "
                 "is too small for this command; lower its memory_budget or raise the limit)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefuse: internal error: %s\n", capped(e.what()).c_str());
    return 3;
  }
  return 0;
}

namespace edgefuse::cli {

CLI::Option* add_threads_option(CLI::App* command, std::size_t& threads) {
  return command->add_option("--threads", threads, "Worker threads (default: all cores)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));
}

}  // namespace edgefuse::cli
